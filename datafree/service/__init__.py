"""The HTTP job service: ``datafree serve`` (see :mod:`datafree.service.app`)."""
