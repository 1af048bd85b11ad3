"""The command line: every --help works, bad input gives a plain error."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from dataclasses import fields

import click
import pytest
from click.testing import CliRunner

import cli
import commands.datafetch
from commands.options import tuned_default_text
from fl.config import TUNED, RunConfig, flag, run_option
from tests.run_configs import changed_config, cli_args

# The commands that take the run options (every RunConfig field).
RUN_COMMANDS = [("simulate",), ("network", "up"), ("network", "init"), ("privacy", "plan")]


def all_commands(group: click.Group, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    yield prefix
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from all_commands(command, (*prefix, name))
        else:
            yield (*prefix, name)


@pytest.mark.parametrize("path", list(all_commands(cli.main)), ids=lambda p: " ".join(p) or "root")
def test_every_command_has_help(path):
    result = CliRunner().invoke(cli.main, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output


def _command(path: tuple[str, ...]) -> click.Command:
    command: click.Command = cli.main
    for name in path:
        assert isinstance(command, click.Group)
        command = command.commands[name]
    return command


@pytest.mark.parametrize("path", RUN_COMMANDS, ids=" ".join)
def test_every_run_option_is_an_option_with_its_declared_default_and_help(path):
    # Prepare
    params = {p.name: p for p in _command(path).params}
    # Assert
    for f in fields(RunConfig):
        assert f.name in params, f"{' '.join(path)} lacks {flag(f.name)}"
        param = params[f.name]
        assert param.opts[0] == flag(f.name)
        assert param.default == f.default
        if f.name in TUNED:  # the default depends on --dp: the help lists it per mechanism
            assert param.help == f"{run_option(f).help} [default: {tuned_default_text(f.name)}]"
        else:
            assert param.help == run_option(f).help


def test_the_help_lists_each_mechanisms_tuned_default():
    # Execute
    text = tuned_default_text("lr")
    # Assert: every mechanism's value, and the low-budget exception
    assert text == "by --dp: none 0.02, gaussian 2.0 (0.5 below --epsilon 5), laplace 10.0"
    assert tuned_default_text("dropout") == "off"  # the same for every mechanism


def test_an_option_left_unset_takes_the_mechanisms_tuned_value_and_a_set_one_is_kept():
    # Execute
    gauss = RunConfig(dp="gaussian")
    low = RunConfig(dp="gaussian", epsilon=2)
    mine = RunConfig(dp="laplace", lr=3.0)
    # Assert
    assert (gauss.batch_size, gauss.lr, gauss.momentum, gauss.server_momentum) == (600, 2.0, 0, 0.9)
    assert (low.lr, low.server_lr_decay) == (0.5, "cosine")
    assert (mine.lr, mine.dp_subspace) == (3.0, 128)
    assert RunConfig().to_dict()["batch_size"] == 10  # the metrics and genesis hold the value


@pytest.mark.parametrize("path", RUN_COMMANDS, ids=" ".join)
def test_run_options_on_the_command_line_give_that_config(path):
    # Prepare: every field off its default, spelled out as arguments
    config = changed_config(clients=3)
    args = cli_args(config)
    if path == ("network", "init"):
        args += ["--out", "unused"]
    # Execute: parse only
    command = _command(path)
    context = command.make_context(" ".join(path), args)
    # Assert
    run = {f.name: context.params[f.name] for f in fields(RunConfig)}
    assert RunConfig(**run) == config


@pytest.mark.parametrize("path", [("simulate",), ("network", "up")], ids=" ".join)
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-K", "0"], "--clients must be >= 1, got 0"),
        (["--frac", "0"], "--frac must be in (0, 1], got 0.0"),
        (["-E", "inf"], "--local-epochs must be positive, got inf"),
        (["--lr", "nan"], "--lr must be positive, got nan"),
        (["--momentum", "1"], "--momentum must be in [0, 1), got 1.0"),
        (["--delta", "1"], "--delta must be in (0, 1), got 1.0"),
        (["--rep-threshold", "1.5"], "--rep-threshold must be in [0, 1], got 1.5"),
        (["--dp-participations", "0"], "--dp-participations must be >= 1, got 0"),
        (["--dp-subspace", "-1"], "--dp-subspace must be >= 0, got -1"),
        (["--threads", "0"], "--threads must be >= 1, got 0"),
        (["--dp", "gaussian", "--epsilon", "0"], "--epsilon must be a positive number, got 0.0"),
        (["-K", "10", "--train-size", "5"], "--clients (10) exceeds the training samples (5)"),
        (
            ["-K", "0", "--server-lr", "0"],
            "--clients must be >= 1, got 0; --server-lr must be positive, got 0.0",
        ),
    ],
)
def test_bad_run_option_values_are_one_line_usage_errors(path, args, message):
    # Execute
    result = CliRunner().invoke(cli.main, [*path, *args])
    # Assert
    assert result.exit_code == 2
    assert [line for line in result.output.splitlines() if "Error" in line] == [f"Error: {message}"]
    assert "Traceback" not in result.output


def test_bad_option_value_is_a_plain_usage_error():
    result = CliRunner().invoke(cli.main, ["simulate", "--frac", "1.5"])
    assert result.exit_code == 2
    assert "--frac must be in (0, 1], got 1.5" in result.output
    assert "Traceback" not in result.output


def test_augmentations_without_dp_is_a_plain_usage_error():
    result = CliRunner().invoke(cli.main, ["simulate", "--dp-augmentations", "4"])
    assert result.exit_code == 2
    assert "--dp-augmentations needs --dp gaussian or laplace" in result.output
    assert "Traceback" not in result.output


def test_reproducible_noise_warns_that_there_is_no_privacy(tmp_path):
    # Execute: the warning comes before the data is looked for
    result = CliRunner().invoke(
        cli.main,
        ["simulate", "--dp", "gaussian", "--reproducible-noise", "--data-dir", str(tmp_path)],
    )
    # Assert
    assert "NO differential privacy" in result.stderr


def test_network_init_refuses_public_noise_outside_a_testbed(tmp_path):
    # Execute
    args = ["network", "init", "--clients", "3", "--dp", "gaussian", "--reproducible-noise"]
    refused = CliRunner().invoke(cli.main, [*args, "--out", str(tmp_path / "a")])
    testbed = CliRunner().invoke(cli.main, [*args, "--testbed", "--out", str(tmp_path / "b")])
    # Assert: a plain error, nothing written; a testbed may
    assert refused.exit_code == 1 and "only on a testbed" in refused.output
    assert "Traceback" not in refused.output
    assert not (tmp_path / "a" / "genesis.toml").exists()
    assert testbed.exit_code == 0, testbed.output
    assert "testbed = true" in (tmp_path / "b" / "genesis.toml").read_text()


def test_simulate_without_data_says_how_to_get_it(tmp_path):
    result = CliRunner().invoke(
        cli.main, ["simulate", "--data-dir", str(tmp_path), "--rounds", "1"]
    )
    assert result.exit_code == 1
    assert "data fetch" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_plot_rejects_a_file_that_is_not_metrics(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"no": 1}')
    result = CliRunner().invoke(cli.main, ["plot", str(bad), "--out", str(tmp_path / "f.png")])
    assert result.exit_code == 1
    assert "not a metrics file" in result.output


def test_plot_overlays_runs(tmp_path):
    # Prepare: two tiny metrics files that differ in --dist
    for dist in ("iid", "noniid"):
        doc = {
            "config": {"dist": dist},
            "rounds": [{"round": 1, "accuracy": 0.5}, {"round": 2, "accuracy": 0.7}],
        }
        (tmp_path / f"{dist}.json").write_text(json.dumps(doc))
    out = tmp_path / "fig.png"
    # Execute
    result = CliRunner().invoke(
        cli.main,
        ["plot", str(tmp_path / "iid.json"), str(tmp_path / "noniid.json"), "--out", str(out)],
    )
    # Assert
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class _FixedFileHandler(http.server.BaseHTTPRequestHandler):
    body = b"definitely not the MNIST archive"

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: object) -> None:
        pass


def test_fetch_rejects_a_download_with_the_wrong_md5(tmp_path, monkeypatch):
    # Prepare: a loopback "mirror" that serves the wrong bytes
    server = http.server.HTTPServer(("127.0.0.1", 0), _FixedFileHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setattr(commands.datafetch, "MIRRORS", (f"http://127.0.0.1:{server.server_port}/",))
    monkeypatch.setattr(commands.datafetch, "_fetch_with_torchvision", lambda root: False)
    try:
        # Execute
        result = CliRunner().invoke(cli.main, ["data", "fetch", "--data-dir", str(tmp_path)])
    finally:
        server.shutdown()
        thread.join()
    # Assert: plain error, nothing left behind in the raw folder
    assert result.exit_code == 1
    assert "does not match" in result.output
    assert "--data-dir" in result.output
    assert list((tmp_path / "MNIST" / "raw").iterdir()) == []


def test_protocol_settings_are_options_of_network_init_with_one_default(tmp_path):
    from dataclasses import replace

    from node.genesis import ProtocolParams, read_genesis

    # Execute
    base = ["network", "init", "--clients", "4"]
    chosen = CliRunner().invoke(
        cli.main,
        [
            *base,
            *("--out", str(tmp_path / "a"), "--round-deadline", "30", "--view-timeout", "2.5"),
            *("--tick", "0.02", "--chunk-bytes", "65536", "--max-stream-bytes", "9000000"),
        ],
    )
    default = CliRunner().invoke(cli.main, [*base, "--out", str(tmp_path / "b")])
    bad = CliRunner().invoke(
        cli.main, [*base, "--out", str(tmp_path / "c"), "--round-deadline", "-1"]
    )
    # Assert
    assert chosen.exit_code == 0 and default.exit_code == 0, chosen.output + default.output
    protocol = read_genesis(tmp_path / "a" / "genesis.toml").protocol
    assert (protocol.round_deadline_ms, protocol.view_timeout_ms) == (30_000, 2_500)
    assert (protocol.tick_ms, protocol.chunk_bytes, protocol.max_stream_bytes) == (
        20,
        65536,
        9_000_000,
    )
    default_protocol = read_genesis(tmp_path / "b" / "genesis.toml").protocol
    assert len(default_protocol.tls_ca_sha256) == 64  # mutual TLS unless --insecure
    assert replace(default_protocol, tls_ca_sha256="") == ProtocolParams()
    assert bad.exit_code == 2 and "--round-deadline must be a positive number" in bad.output
    assert not (tmp_path / "c").exists()
    up = _command(("network", "up"))
    assert {p.name: p.default for p in up.params}["round_deadline_ms"] == 120.0
