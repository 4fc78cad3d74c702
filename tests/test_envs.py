from pathlib import Path

import pytest

from ep_runtime import envs

ROOT = Path(__file__).resolve().parents[1]


def test_docs_are_generated_from_the_registry():
    doc = (ROOT / "docs" / "environment_variables.md").read_text()
    assert doc == envs.markdown(), "regenerate with `make docs` (ep-runtime env --markdown)"


def test_no_module_reads_os_environ_outside_the_registry():
    offenders = []
    for folder in ("ep_runtime", "dispatchers", "runners"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.name == "envs.py":
                continue
            text = path.read_text()
            if "os.environ" in text or "os.getenv" in text:
                offenders.append(str(path.relative_to(ROOT)))
    assert not offenders


def test_defaults_and_typed_values(monkeypatch):
    monkeypatch.delenv("EP_RUNTIME_TIMEOUT_S", raising=False)
    assert envs.get("TIMEOUT_S") == 300.0
    monkeypatch.setenv("EP_RUNTIME_TIMEOUT_S", "12.5")
    assert envs.get("EP_RUNTIME_TIMEOUT_S") == 12.5


@pytest.mark.parametrize("name,value,match", [
    ("EP_RUNTIME_MORI_MOE_MAX_INPUT_TOKENS", "abc", r"EP_RUNTIME_MORI_MOE_MAX_INPUT_TOKENS='abc' is not a valid int"),
    ("EP_RUNTIME_MORI_MOE_MAX_INPUT_TOKENS", "-3", r"'-3' is below the minimum; allowed: int >= 0"),
    ("EP_RUNTIME_TIMEOUT_S", "0", r"EP_RUNTIME_TIMEOUT_S='0' is below the minimum; allowed: float >= 1"),
    ("EP_RUNTIME_RUNNER", "cuda", r"EP_RUNTIME_RUNNER='cuda' is not allowed; allowed: auto, torch, triton, masked"),
])
def test_invalid_values_name_the_variable(monkeypatch, name, value, match):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=match):
        envs.get(name)
    with pytest.raises(ValueError, match=match):
        envs.validate_all()


def test_unknown_knob():
    with pytest.raises(KeyError, match="unknown knob EP_RUNTIME_NOPE"):
        envs.get("NOPE")


def test_a_mistyped_variable_is_reported(monkeypatch, capsys):
    from ep_runtime import cli
    monkeypatch.setenv("EP_RUNTIME_MORI_MAX_INPUT_TOKENS", "64")  # the knob is ..._MORI_MOE_MAX_INPUT_TOKENS
    assert "EP_RUNTIME_MORI_MAX_INPUT_TOKENS" in envs.unknown()
    assert not set(envs.unknown()) & set(envs.KNOBS)
    with pytest.warns(UserWarning, match=r"ignoring unknown variables .*EP_RUNTIME_MORI_MAX_INPUT_TOKENS"):
        envs.validate_all()
    with pytest.warns(UserWarning):
        assert cli.main(["env"]) == 0
    assert "EP_RUNTIME_MORI_MAX_INPUT_TOKENS  (unknown: not an ep-runtime knob, ignored)" in capsys.readouterr().out
