"""The typed configs: every field described, choices that match the registries, one sentence per mistake."""
import dataclasses

import pytest

from datafree.base.config import build_config
from datafree.base.errors import UserError
from datafree.condense.config import CONDENSE_METHODS, CondenseJob, job_from_dict
from datafree.distill.config import GENERATOR_NAMES, PRESET_NAMES, DistillConfig
from datafree.distill.presets import PRESETS, resolve_distill_config


def test_choices_are_the_registries():
    from datafree.condense.settings import CONDENSERS
    from generators import GENERATORS

    assert set(PRESET_NAMES) == set(PRESETS)
    assert set(GENERATOR_NAMES) == set(GENERATORS)
    assert set(CONDENSE_METHODS) == set(CONDENSERS)


@pytest.mark.parametrize("cls", [DistillConfig, CondenseJob])
def test_every_field_has_a_sentence(cls):
    for field in dataclasses.fields(cls):
        description = cls.__pydantic_fields__[field.name].description
        assert description and len(description) > 10, field.name


@pytest.mark.parametrize("values, sentence", [
    ({"steps": "ten"}, "config field 'steps' must be an integer, got 'ten'"),
    ({"steps": 0}, "config field 'steps' must be at least 1, got 0"),
    ({"steps": 2.0}, "config field 'steps' must be an integer, got 2.0"),
    ({"augment": "yes"}, "config field 'augment' must be true or false, got 'yes'"),
    ({"schedule": "fast"}, "unknown schedule 'fast'; use auto or fixed"),
    ({"stepz": 3}, "unknown config field 'stepz'"),
    ({"mixup": 1.5}, "config field 'mixup' must be at most 1.0, got 1.5"),
])
def test_a_distill_mistake_is_one_sentence_naming_the_field(values, sentence):
    with pytest.raises(UserError) as e:
        build_config(DistillConfig, {"teacher": "t", **values})
    assert str(e.value) == sentence


def test_yaml_and_flags_are_checked_alike(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("teacher: t\nsteps: '12'\n")
    with pytest.raises(UserError, match="config field 'steps' must be an integer, got '12'"):
        resolve_distill_config("dfq", yaml_path=path)
    path.write_text("teacher: t\nsteps: 12\nlr_student: 1\n")  # an integer where a number goes is fine
    assert resolve_distill_config("dfq", yaml_path=path).lr_student == 1.0


def test_condense_job_checks():
    assert job_from_dict({"ipc": 3, "time_budget": 90}).budget_seconds() == 90.0
    with pytest.raises(UserError, match="unknown method 'magic'; use dc, dsa, dm, gm_pool, dm_pool, random, herding or kcenter"):
        job_from_dict({"method": "magic"})
    with pytest.raises(UserError, match="config field 'real_per_class' must be at least 1, got 0"):
        job_from_dict({"real_per_class": 0})


def test_openapi_lists_every_distill_and_condense_field(tmp_path):
    from datafree.service.app import create_app
    from datafree.service.jobs import CLIENT_BLOCKED, CONDENSE_SERVER_FIELDS
    from datafree.service.store import Store

    app = create_app(Store(tmp_path / "store"), start_workers=False)
    schema = app.openapi()  # what GET /openapi.json serves (behind the token)
    configs = {c["title"]: c for c in schema["components"]["schemas"]["JobRequest"]["properties"]["config"]["oneOf"]}
    for kind, cls, hidden in (("distill", DistillConfig, CLIENT_BLOCKED | {"preset_note"}), ("condense", CondenseJob, CONDENSE_SERVER_FIELDS)):
        properties = configs[f"{kind} config"]["properties"]
        assert set(properties) == {f.name for f in dataclasses.fields(cls)} - hidden
        for name, spec in properties.items():
            assert spec.get("description"), (kind, name)
            assert "type" in spec or "anyOf" in spec or "enum" in spec, (kind, name)
    steps = configs["distill config"]["properties"]["steps"]
    assert steps.get("default") is None and {"type": "integer", "minimum": 1} in steps["anyOf"]  # none: 1,000, or the budget ends it
    assert configs["condense config"]["properties"]["method"]["enum"] == list(CONDENSE_METHODS)


@pytest.mark.parametrize("config, flags", [({"steps": 0}, ["--steps", "0"]), ({"schedule": "fast"}, ["--schedule", "fast"]),
                                           ({"time_budget": "soon"}, ["--time-budget", "soon"])])
def test_a_wrong_distill_field_reads_the_same_over_http_and_on_the_command_line(tmp_path, capsys, config, flags):
    from datafree.cli import main
    from datafree.service.jobs import validate_job

    class OneTeacher:  # a store holding one uploaded teacher
        def teacher(self, teacher_id):
            return {"id": teacher_id}

    with pytest.raises(UserError) as over_http:
        validate_job(OneTeacher(), "distill", {"teacher": "t1", **config})
    try:
        code = main(["distill", *flags, "--out", str(tmp_path / "x"), "--no-eval"])
    except SystemExit as stop:  # argparse refuses a choice before the config does, in its own words
        code = stop.code
        assert "invalid choice: 'fast'" in capsys.readouterr().err and "unknown schedule 'fast'" in str(over_http.value)
    else:
        assert capsys.readouterr().err.strip().endswith(str(over_http.value))
    assert code == 2 and not (tmp_path / "x").exists()
