"""Job kinds of the service: a request's config is validated with the same typed config the command
line uses, then the job runs as a ``datafree`` command in a worker process.

Kinds and their config (JSON):

- ``distill``: ``{"teacher": TEACHER_ID or [TEACHER_ID, ...], ...DistillConfig fields}`` (``preset`` picks defaults);
- ``condense``: ``{"source": "mnist" | "job:DISTILL_JOB_ID", ...}`` and the other fields of
  :class:`datafree.condense.config.CondenseJob` that a client may set (:func:`condense_fields`);
- ``evaluate``: ``{"job": CONDENSE_JOB_ID, "arch", "models", "epochs", "test", "protocol"}``;
- ``audit``: ``{"job": DISTILL_OR_CONDENSE_JOB_ID, "real": "mnist" | null}``;
- ``export``: ``{"job": DISTILL_JOB_ID, "int8": false, "onnx": true, "test": "mnist" | null}``;
- ``compress``: ``{"teacher": TEACHER_ID, ...}`` and the other fields of
  :class:`datafree.compress.config.CompressConfig` a client may set (pruning target, importance,
  time budget, int8, onnx, eval_data).

Clients name stored teachers, finished jobs and data sets by name, never server paths.

Example:
    >>> validate_job(None, "condense", {"source": "mnist", "ipc": 1})
    {'source': 'mnist', 'ipc': 1}
    >>> validate_job(None, "condense", {"ipc": "ten"})
    Traceback (most recent call last):
    datafree.base.errors.UserError: config field 'ipc' must be an integer, got 'ten'
    >>> argv = command_for(store, {"id": job_id, "kind": "condense", "config": config})   # doctest: +SKIP
"""
from __future__ import annotations

import sys
from pathlib import Path

from datafree.base.errors import UserError

KINDS = ("distill", "condense", "evaluate", "audit", "export", "compress")
CLIENT_BLOCKED = {"out", "data_dir", "teacher_input_spec", "accelerator", "devices", "num_nodes", "strategy"}

CONDENSE_SERVER_FIELDS = {"out", "data_dir", "download", "devices", "num_nodes", "strategy", "resume", "overwrite", "progress",
                          "soft_label_model", "accelerator"}  # a path or the hardware of the server: not a client's to name
DEVICE_KINDS = ("distill", "condense", "evaluate", "compress")  # the jobs that train networks: they run on the server's accelerator
EVALUATE_FIELDS = {"job": str, "arch": str, "models": int, "epochs": int, "test": str, "protocol": str, "soft_labels": bool}
AUDIT_FIELDS = {"job": str, "real": str, "membership": bool, "members": str, "non_members": str, "samples": int,
                "references": int, "reference_data": str}  # membership: the membership-inference audit of the job's student or set
MEMBERSHIP_KEYS = ("members", "non_members", "samples", "references", "reference_data")  # passed on to `audit --membership`
EXPORT_FIELDS = {"job": str, "int8": bool, "onnx": bool, "test": str}
COMPRESS_SERVER_FIELDS = {"out", "data_dir", "accelerator"}  # a path or the server's hardware


def condense_fields() -> list[str]:
    """The condense job's fields a client may set: :class:`~datafree.condense.config.CondenseJob`'s, less the server's."""
    from datafree.condense.config import JOB_FIELDS

    return [name for name in JOB_FIELDS if name not in CONDENSE_SERVER_FIELDS]


def config_schemas() -> dict:
    """JSON schema of each job kind's config (field, type, default, sentence), for ``/openapi.json``.

    Example:
        >>> schemas = config_schemas()
        >>> schemas["condense"]["properties"]["ipc"]["default"], schemas["distill"]["properties"]["time_budget"]["default"]
        (10, None)
    """
    from pydantic import TypeAdapter

    from datafree.compress.config import CompressConfig
    from datafree.condense.config import CondenseJob
    from datafree.distill.config import DistillConfig

    def typed(cls, hidden, overrides):
        schema = TypeAdapter(cls).json_schema()
        schema["properties"] = {k: v for k, v in schema["properties"].items() if k not in hidden} | overrides
        schema.pop("title", None)
        return schema

    words = {str: "string", int: "integer", bool: "boolean"}
    plain = lambda fields, required=(): {"type": "object", "additionalProperties": False, "required": list(required),
                                         "properties": {k: {"type": words[t]} for k, t in fields.items()}}
    return {
        "distill": typed(DistillConfig, CLIENT_BLOCKED | {"preset_note"},
                         {"teacher": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}],
                                      "description": "id of an uploaded teacher (GET /v1/teachers), or a list of ids: "
                                                     "an ensemble whose combined soft targets (ensemble_rule) the student learns"}}),
        "condense": typed(CondenseJob, CONDENSE_SERVER_FIELDS,
                          {"source": {"type": "string", "default": "mnist",
                                      "description": "a data set name, or job:ID of a finished distill job (data-free)"}}),
        "evaluate": plain(EVALUATE_FIELDS, ("job",)), "audit": plain(AUDIT_FIELDS, ("job",)),
        "export": plain(EXPORT_FIELDS, ("job",)),
        "compress": typed(CompressConfig, COMPRESS_SERVER_FIELDS,
                          {"teacher": {"type": "string", "description": "id of an uploaded teacher (GET /v1/teachers): "
                                                                        "safetensors with its card; .pt2 and TorchScript cannot be pruned"}}),
    }


def _check_fields(config: dict, fields: dict, required: tuple[str, ...] = ()) -> dict:
    if not isinstance(config, dict):
        raise UserError("config must be a JSON object")
    for key, value in config.items():
        if key not in fields:
            raise UserError(f"unknown config field {key!r}; known: {', '.join(fields)}")
        want = fields[key]
        ok = value is None or (isinstance(value, want) and not (want is not bool and isinstance(value, bool)))
        if not ok:
            words = {int: "an integer", str: "a string", bool: "true or false", float: "a number"}
            raise UserError(f"config field {key!r} must be {words.get(want, want.__name__)}, got {value!r}")
    for key in required:
        if config.get(key) is None:
            raise UserError(f"config field {key!r} is required")
    return {k: v for k, v in config.items() if v is not None}


def _data_name(name: str | None, field: str) -> None:
    from datafree.data.datasets import TORCHVISION_SETS, canonical_name

    if name is not None and canonical_name(name) not in TORCHVISION_SETS:
        raise UserError(f"config field {field!r}: unknown data set {name!r}; known: {', '.join(sorted(TORCHVISION_SETS))}")


def _finished_job(store, job_id: str, kinds: tuple[str, ...], field: str = "job") -> dict:
    job = store.job(str(job_id).removeprefix("job:"))
    if job is None or job["kind"] not in kinds:
        raise UserError(f"config field {field!r}: no {' or '.join(kinds)} job {job_id!r}")
    if job["state"] != "succeeded":
        raise UserError(f"config field {field!r}: job {job['id']} has not succeeded (it is {job['state']})")
    return job


def validate_job(store, kind: str, config: dict) -> dict:
    """Check a job request; return the config to store. Raises :class:`UserError` naming the field."""
    from datafree.base.config import parse_duration
    from datafree.distill.presets import resolve_distill_config

    if kind not in KINDS:
        raise UserError(f"unknown job kind {kind!r}; known: {', '.join(KINDS)}")
    if kind == "distill":
        if not isinstance(config, dict):
            raise UserError("config must be a JSON object")
        blocked = sorted(set(config) & CLIENT_BLOCKED)
        if blocked:
            raise UserError(f"config field {blocked[0]!r} is set by the server, not by a job")
        ids = config.get("teacher") if isinstance(config.get("teacher"), list) else [config.get("teacher")]
        for teacher_id in ids or [None]:
            if not teacher_id or not isinstance(teacher_id, str) or store.teacher(teacher_id) is None:
                raise UserError(f"config field 'teacher': no uploaded teacher {teacher_id!r} (see GET /v1/teachers)")
        _data_name(config.get("eval_data"), "eval_data")
        if config.get("time_budget") is not None:
            parse_duration(config["time_budget"])
        resolve_distill_config(overrides={**config, "teacher": ["stored"] * len(ids) if len(ids) > 1 else "stored"})  # typed config
        return dict(config)
    if kind == "condense":
        from datafree.condense.config import job_from_dict

        if not isinstance(config, dict):
            raise UserError("config must be a JSON object")
        blocked = sorted(set(config) & CONDENSE_SERVER_FIELDS)
        if blocked:
            raise UserError(f"config field {blocked[0]!r} is set by the server, not by a job")
        job_from_dict(dict(config, source="mnist"))  # the command line's typed config: types, ranges, choices, in its words
        config = {k: v for k, v in config.items() if v is not None}
        source = config.get("source", "mnist")
        if not isinstance(source, str):
            raise UserError(f"config field 'source' must be a string, got {source!r}")
        if source.startswith("job:"):
            _finished_job(store, source, ("distill",), "source")
        else:
            _data_name(source, "source")
        _data_name(config.get("test"), "test")
        return config
    if kind == "compress":
        return _validate_compress(store, config)
    if kind == "evaluate":
        config = _check_fields(config, EVALUATE_FIELDS, ("job",))
        _finished_job(store, config["job"], ("condense",))
        _data_name(config.get("test"), "test")
        from datafree.models.zoo import MODELS

        MODELS.get_or_fail(config.get("arch", "convnet"))
        from datafree.outputs.evaluate import PROTOCOLS

        if config.get("protocol", "fixed") not in PROTOCOLS:
            raise UserError(f"unknown evaluation protocol {config['protocol']!r}; use {' or '.join(PROTOCOLS)}")
        return config
    if kind == "audit":
        config = _check_fields(config, AUDIT_FIELDS, ("job",))
        _finished_job(store, config["job"], ("distill", "condense"))
        _data_name(config.get("real"), "real")
        membership = {k: config[k] for k in MEMBERSHIP_KEYS if k in config}
        if config.get("membership"):
            from datafree.outputs.membership_job import membership_config

            membership_config(membership | {"target": "job"})  # both sides given, types and ranges, in its words
            for field in ("members", "non_members", "reference_data"):
                if field not in config:
                    continue
                name, _, split = config[field].partition(":")
                _data_name(name, field)
                if split not in ("", "train", "test"):
                    raise UserError(f"config field {field!r}: unknown split {split!r}; use NAME, NAME:train or NAME:test")
        elif membership:
            raise UserError(f"config field {next(iter(membership))!r} applies only with membership: true")
        return config
    config = _check_fields(config, EXPORT_FIELDS, ("job",))
    _finished_job(store, config["job"], ("distill",))
    _data_name(config.get("test"), "test")
    return config


def _validate_compress(store, config: dict) -> dict:
    from datafree.compress.config import compress_config
    from datafree.compress.job import check_prunable

    if not isinstance(config, dict):
        raise UserError("config must be a JSON object")
    blocked = sorted(set(config) & COMPRESS_SERVER_FIELDS)
    if blocked:
        raise UserError(f"config field {blocked[0]!r} is set by the server, not by a job")
    teacher = store.teacher(config["teacher"]) if isinstance(config.get("teacher"), str) else None
    if teacher is None:
        raise UserError(f"config field 'teacher': no uploaded teacher {config.get('teacher')!r} (see GET /v1/teachers)")
    path = store.teacher_dir(teacher["id"]) / teacher["file"]
    try:
        check_prunable(path)
    except UserError as e:  # the sentence names the stored teacher, not its path on the server
        raise UserError(str(e).replace(repr(str(path)), f"teacher {teacher['id']!r}")) from None
    _data_name(config.get("eval_data"), "eval_data")
    compress_config(dict(config, teacher="stored"))  # the command line's typed config: types, ranges, choices, in its words
    return {k: v for k, v in config.items() if v is not None}


def _run_of(store, job_id: str) -> Path:
    return store.job_dir(job_id.removeprefix("job:")) / "run"


def command_for(store, job: dict, resume: bool = False, device: dict | None = None) -> list[str]:
    """The ``datafree`` command line of a job; its output folder is the job's ``run/``. ``device``
    holds the server's ``accelerator`` and default ``precision`` (a job's own precision wins)."""
    kind, config, out = job["kind"], job["config"], store.job_dir(job["id"]) / "run"
    argv = [sys.executable, "-m", "datafree.cli"]
    return argv + _job_arguments(store, job, kind, config, out, resume) + device_flags(kind, config, device or {})


def device_flags(kind: str, config: dict, device: dict) -> list[str]:
    """The server's device settings as flags for a job that trains networks (none for the others).

    Example:
        >>> device_flags("distill", {"precision": "fp32"}, {"accelerator": "gpu", "precision": "auto"})
        ['--accelerator', 'gpu']
        >>> device_flags("audit", {}, {"accelerator": "gpu"})
        []
    """
    if kind not in DEVICE_KINDS:
        return []
    flags = ["--accelerator", device["accelerator"]] if device.get("accelerator") else []
    if device.get("precision") and "precision" not in config:
        flags += ["--precision", device["precision"]]
    return flags


def _job_arguments(store, job: dict, kind: str, config: dict, out: Path, resume: bool) -> list[str]:
    argv: list[str] = []
    if kind == "distill":
        import yaml

        values = {k: v for k, v in config.items() if k not in ("teacher", "preset")}
        ids = config["teacher"] if isinstance(config["teacher"], list) else [config["teacher"]]
        paths = [str(store.teacher_dir(t["id"]) / t["file"]) for t in map(store.teacher, ids)]
        values["teacher"] = paths if len(paths) > 1 else paths[0]
        path = store.job_dir(job["id"]) / "config.yaml"
        path.write_text(yaml.safe_dump(values))
        argv += ["distill", "--config", str(path), "--out", str(out), "--no-progress"]
        if config.get("preset"):
            argv += ["--preset", config["preset"]]
        if "eval_data" not in config:
            argv += ["--no-eval"]
        return argv + (["--resume"] if resume else [])
    if kind == "condense":
        source = config.get("source", "mnist")
        argv += ["condense", "--source", str(_run_of(store, source)) if source.startswith("job:") else source,
                 "--out", str(out), "--no-progress"]
        for key, value in config.items():
            if key == "source":
                continue
            flag = "--" + key.replace("_", "-")
            argv += [flag] if value is True else [] if value is False else [flag, str(value)]
        return argv + (["--resume"] if resume else [])
    if kind == "evaluate":
        out.mkdir(parents=True, exist_ok=True)
        argv += ["evaluate-set", str(_run_of(store, config["job"])), "--out", str(out), "--no-progress"]
        for key in ("arch", "models", "epochs", "test", "protocol"):
            if key in config:
                argv += ["--" + key, str(config[key])]
        if config.get("soft_labels"):
            argv.append("--soft-labels")
        return argv
    if kind == "audit":
        out.mkdir(parents=True, exist_ok=True)
        if config.get("membership"):
            argv += ["audit", str(_run_of(store, config["job"])), "--membership", "--out", str(out), "--no-progress"]
            for key in MEMBERSHIP_KEYS:
                if key in config:
                    argv += ["--" + key.replace("_", "-"), str(config[key])]
            return argv
        argv += ["audit", str(_run_of(store, config["job"])), "--out", str(out / "audit.json"), "--no-progress"]
        return argv + (["--real", config["real"]] if config.get("real") else [])
    if kind == "compress":
        teacher = store.teacher(config["teacher"])
        argv += ["compress", "--teacher", str(store.teacher_dir(teacher["id"]) / teacher["file"]), "--out", str(out), "--no-progress"]
        for key, value in config.items():
            if key != "teacher":
                flag = "--" + key.replace("_", "-")
                argv += [flag] if value is True else ["--no-" + key.replace("_", "-")] if value is False else [flag, str(value)]
        if "eval_data" not in config:
            argv += ["--no-eval"]
        return argv + (["--resume"] if resume else [])
    argv += ["export", "student", str(_run_of(store, config["job"])), "--out", str(out), "--no-progress"]
    if config.get("int8"):
        argv.append("--int8")
    if config.get("onnx") is False:
        argv.append("--no-onnx")
    return argv + (["--test", config["test"]] if config.get("test") else [])


def resumable(store, job: dict) -> bool:
    """Whether a job killed mid-run left a checkpoint to continue from."""
    run = store.job_dir(job["id"]) / "run"
    if job["kind"] == "distill":
        return (run / "checkpoints" / "last.ckpt").is_file() and (run / "config.yaml").is_file()
    if job["kind"] == "condense":
        return (run / "checkpoints" / "condense.pt").is_file()
    if job["kind"] == "compress":
        return (run / "pruned.safetensors").is_file() and (run / "recovery" / "checkpoints" / "last.ckpt").is_file()
    return False
