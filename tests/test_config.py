from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dilo import cli
from dilo.config import DDPConfig, DiLoCoConfig, FedAvgConfig, RunConfig, load, parse_overrides
from dilo.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
CONFIGS = sorted((REPO / "configs").glob("**/*.toml"))


def test_there_are_configs() -> None:
    assert any(p.name == "quickstart.toml" for p in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_loads(path: Path) -> None:
    cfg = load(path)
    assert isinstance(cfg, RunConfig)
    assert cfg.steps >= cfg.round_steps


def test_loading_a_config_does_not_import_torch() -> None:
    """`dilo run` validates the config before it starts its workers: with the default outer SGD
    that takes no torch import (seconds per launch on a loaded machine)."""
    code = (
        "import sys; from dilo.config import load; "
        f"load({str(REPO / 'configs' / 'quickstart.toml')!r}, ['--outer.momentum=0.3']); "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False", out.stderr


def test_nesterov_without_momentum_is_refused_at_config_time() -> None:
    with pytest.raises(ConfigError, match="outer.nesterov = true needs outer.momentum > 0"):
        load(REPO / "configs" / "quickstart.toml", ["--outer.momentum=0"])
    assert load(REPO / "configs" / "quickstart.toml", ["--outer.momentum=0", "--outer.nesterov=false"])


def test_quickstart_is_the_documented_main_job() -> None:
    cfg = load(REPO / "configs" / "quickstart.toml")
    assert cfg.workers == 4 and isinstance(cfg.outer, DiLoCoConfig) and cfg.data.corpus == "stdlib"


def test_overrides_are_typed_and_nested() -> None:
    assert parse_overrides(["--outer.lr=0.5", "--inner.precision", "bf16", "--inner.betas=[0.8, 0.9]", "--name=x"]) == {
        "outer": {"lr": 0.5},
        "inner": {"precision": "bf16", "betas": [0.8, 0.9]},
        "name": "x",
    }
    cfg = load(None, ["--outer.kind=fedavg", "--outer.inner_steps=10"])
    assert isinstance(cfg.outer, FedAvgConfig) and cfg.outer.inner_steps == 10 and cfg.outer.lr == 1.0
    assert isinstance(load(None, ["--outer.kind=ddp"]).outer, DDPConfig)
    # switching kind on the command line drops the file's settings of the other kind
    quick = REPO / "configs" / "quickstart.toml"
    assert isinstance(load(quick, ["--outer.kind=ddp"]).outer, DDPConfig)
    fed = load(quick, ["--outer.kind=fedavg", "--outer.inner_steps=7"]).outer
    assert isinstance(fed, FedAvgConfig) and fed.inner_steps == 7
    assert load(quick, ["--outer.kind=diloco"]).outer.inner_steps == 25  # same kind: file settings kept


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["--outer.lrr=1"], "unknown key 'outer.lrr'; allowed keys here: fragment_delay, fragment_pattern"),
        (["--bogus=1"], "unknown key 'bogus'"),
        (["--outer.kind=foo"], "'diloco', 'fedavg', 'ddp'"),
        (["--inner.precision=fp8"], "inner.precision: Input should be 'fp32', 'bf16' or 'auto' (got 'fp8')"),
        (["--inner.lr=-1"], "inner.lr: Input should be greater than 0"),
        (["--inner.lr=abc"], "inner.lr: Input should be a valid number"),
        (["--model.n_head=3"], "n_head=3 must divide d_model=128"),
        (["--data.seq_len=4096"], "data.seq_len=4096 exceeds model.context=128"),
        (["--data.corpus=text"], "data.corpus='text' needs data.paths"),
        (["--outer.kind=fedavg", "--outer.momentum=0.9"], "unknown key 'outer.momentum'"),
        (["--inner.betas=[0.9, 1.5]"], "betas=(0.9, 1.5) must both lie in [0, 1)"),
        (["outer.lr=1"], "overrides look like --section.key=value"),
        (["--outer.lr"], "has no value"),
    ],
)
def test_bad_configs_say_what_to_fix(overrides: list[str], expected: str) -> None:
    with pytest.raises(ConfigError) as e:
        load(None, overrides)
    assert expected in str(e.value)


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[outer\nlr = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(bad)


def test_fingerprint_ignores_logging_but_not_training() -> None:
    a = load(None)
    assert a.fingerprint() == load(None, ["--log.progress=false", "--checkpoint.every=3"]).fingerprint()
    assert a.fingerprint() != load(None, ["--outer.lr=0.5"]).fingerprint()


def test_cli_config_show_and_schema(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["config", "show", str(REPO / "configs" / "quickstart.toml"), "--outer.lr=0.25"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["outer"]["lr"] == 0.25 and shown["workers"] == 4
    assert cli.main(["config", "schema"]) == 0
    sch = json.loads(capsys.readouterr().out)
    assert "H: inner steps between two outer steps." in json.dumps(sch)
    assert cli.main(["config", "show", str(REPO / "configs" / "quickstart.toml"), "--outer.lrr=1"]) == 2
    assert "unknown key 'outer.lrr'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("--membership.address=tcp://127.0.0.1:70000", "membership.address: Value error, port 70000 is out of range"),
        ("--membership.address=tcp://127.0.0.1:0", "membership.address: Value error, port 0 (a free port"),
        ("--membership.address=tcp://127.0.0.1:-1", "membership.address: Value error, port -1 is out of range"),
        ("--membership.address=127.0.0.1:29600", "membership.address: Value error, expected tcp://HOST:PORT"),
        ("--membership.p2p_bind=tcp://127.0.0.1:65536", "membership.p2p_bind: Value error, port 65536 is out of range"),
        ("--membership.p2p_advertise=tcp://10.0.0.2:0", "membership.p2p_advertise: Value error, port 0 (a free port"),
        ("--coordinator.bind=tcp://0.0.0.0:99999", "coordinator.bind: Value error, port 99999 is out of range"),
        ("--coordinator.advertise=tcp://c:123456", "coordinator.advertise: Value error, port 123456 is out of range"),
        ('--membership.peers=["tcp://a:1", "tcp://b:70000"]', "membership.peers[1]: Value error, port 70000 is out"),
        ('--membership.peers=["tcp://a:0", "tcp://b:2"]', "membership.peers[0]: Value error, port 0 (a free port"),
    ],
)
def test_ports_out_of_range_are_refused_with_key_and_value(override: str, expected: str) -> None:
    with pytest.raises(ConfigError) as e:
        load(None, ["--workers=2", override])
    assert expected in str(e.value)
    value = override.partition("=")[2]
    if not value.startswith("["):
        assert f"(got {value!r})" in str(e.value)


def test_ports_in_range_are_accepted() -> None:
    cfg = load(
        None,
        [
            "--workers=2",
            "--membership.address=tcp://10.0.0.1:65535",
            "--membership.p2p_bind=tcp://0.0.0.0:0",  # binding may pick a free port
            "--membership.p2p_advertise=tcp://10.0.0.2:1",
            '--membership.peers=["tcp://a:1", "tcp://b:65535"]',
            "--coordinator.bind=tcp://*:0",
            "--coordinator.advertise=tcp://coordinator:29600",
        ],
    )
    assert cfg.membership.peers == ["tcp://a:1", "tcp://b:65535"] and cfg.coordinator.bind == "tcp://*:0"


def test_cli_names_the_bad_port(capsys: pytest.CaptureFixture[str]) -> None:
    quick = str(REPO / "configs" / "quickstart.toml")
    assert cli.main(["config", "show", quick, "--coordinator.bind=tcp://0.0.0.0:70000"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dilo: error: ") and "coordinator.bind" in err and "'tcp://0.0.0.0:70000'" in err


def test_errors_inside_lists_name_the_item() -> None:
    with pytest.raises(ConfigError) as e:
        load(None, ['--codec.overrides=[{pattern = "emb", kind = "fp16", bogus = 1}]'])
    assert "unknown key 'codec.overrides[0].bogus'; allowed keys here: block, chunk" in str(e.value)
    with pytest.raises(ConfigError, match=r"codec\.overrides\[0\]: Value error, pattern '\(' is not a valid"):
        load(None, ['--codec.overrides=[{pattern = "(", kind = "fp16"}]'])
