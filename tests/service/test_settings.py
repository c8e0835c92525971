"""service/settings.py: settings that cannot work are refused at start, in one line that names them."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from service import __main__ as launcher
from service.settings import MAX_UPLOAD_BYTES, Settings, settings_problem


@pytest.mark.parametrize("values, message", [
    ({"max_queue_delay_ms": 3000, "request_timeout_s": 1},
     "ACMIX_MAX_QUEUE_DELAY_MS (3000) must be below ACMIX_REQUEST_TIMEOUT_S (1 s)"),
    ({"port": 9000, "grpc_port": 9000}, "the HTTP and the gRPC port are both 9000"),
    # gRPC's message limit is a 32-bit int: the server used to fail at start with an OverflowError
    ({"max_upload_bytes": MAX_UPLOAD_BYTES + 1}, "ACMIX_MAX_UPLOAD_BYTES=2147418112: Input should be less than"),
    ({"log_level": "loud"}, "ACMIX_LOG_LEVEL='loud': Input should be 'critical', 'error'"),
    ({"max_queue_size": 0}, "ACMIX_MAX_QUEUE_SIZE=0: Input should be greater than or equal to 1"),
    # started, then answered 404 at /v2/models/a/b/ready: a name the routes cannot address
    ({"model_name": "a/b"}, "ACMIX_MODEL_NAME='a/b': must be letters, digits, '_', '.' or '-'"),
    ({"model_name": ""}, "ACMIX_MODEL_NAME='': must be letters"),
    ({"model_name": ".."}, "ACMIX_MODEL_NAME='..': must be letters"),
    # an empty secret turned authentication off without a word; spaces made a key no header carries
    ({"api_key": ""}, "ACMIX_API_KEY: is empty or has spaces around it"),
    ({"api_key": "   "}, "ACMIX_API_KEY: is empty or has spaces around it"),
])
def test_settings_that_cannot_work_are_refused_naming_the_variable(values, message):
    with pytest.raises(ValidationError) as caught:
        Settings(**values)
    assert message in settings_problem(caught.value)


def test_a_refused_api_key_is_named_but_never_printed():
    with pytest.raises(ValidationError) as caught:
        Settings(api_key=" s3cret-value")
    problem = settings_problem(caught.value)
    assert "ACMIX_API_KEY: is empty or has spaces around it" in problem and "s3cret" not in problem
    assert "s3cret" not in str(caught.value)  # the whole error, as Ray Serve prints it at import


def test_settings_that_can_work_pass():
    settings = Settings(max_queue_delay_ms=999, request_timeout_s=1, log_level="WARNING", grpc_port=0,
                        max_upload_bytes=MAX_UPLOAD_BYTES)
    assert settings.log_level == "warning"
    assert Settings(model_name="resnet-50.v2_b", api_key="k3y with inner space").model_name == "resnet-50.v2_b"


def test_the_launcher_exits_2_with_one_line_for_a_bad_setting(monkeypatch, capsys):
    monkeypatch.setenv("ACMIX_MAX_QUEUE_SIZE", "none")
    assert launcher.main([]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: invalid settings: ACMIX_MAX_QUEUE_SIZE='none'")
    monkeypatch.delenv("ACMIX_MAX_QUEUE_SIZE")
    assert launcher.main(["--port", "9100", "--grpc-port", "9100"]) == 2  # flags are checked with the environment
    assert "both 9100" in capsys.readouterr().err


def test_provision_only_makes_the_artifacts_whatever_acmix_rebuild_says(monkeypatch):
    """ACMIX_REBUILD=false refuses to build at a service's start; `--provision-only` (compose's
    export service, which shares the setting) is the way to build, so it builds (provisioning faked)."""
    plans = []

    def provision(plan, force_engine=False, log=None):
        plans.append(plan)
        return iter(())

    monkeypatch.setattr(launcher, "provision", provision)
    monkeypatch.setenv("ACMIX_REBUILD", "false")
    monkeypatch.setenv("ACMIX_BACKEND", "onnxruntime")
    assert launcher.main(["--provision-only"]) == 0
    assert plans[-1].rebuild is True


def test_a_misspelt_setting_is_named_with_the_one_it_is_closest_to_and_internal_variables_are_known():
    """pydantic-settings ignores ACMIX_REQUEST_TIMEOUT (no _S): the service started with the default."""
    from export.provision import LOCK_HELD
    from service.settings import OTHER_VARIABLES, unknown_variables
    from service.workers import COUNT_ENV, FOLDER_ENV, INDEX_ENV

    assert {LOCK_HELD, INDEX_ENV, COUNT_ENV, FOLDER_ENV, "ACMIX_DATA_DIR"} <= set(OTHER_VARIABLES)
    environ = {"ACMIX_REQUEST_TIMEOUT": "1", "ACMIX_PORT": "8000", "acmix_log_level": "info", "ACMIX_DATA_DIR": "/d",
               INDEX_ENV: "0", "ACMIX_ZZZ": "1", "PATH": "/bin"}
    assert unknown_variables(environ) == ["ACMIX_REQUEST_TIMEOUT (ACMIX_REQUEST_TIMEOUT_S?)", "ACMIX_ZZZ"]
