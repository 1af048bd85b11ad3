"""The command line: every --help works, bad input gives a plain error."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator

import click
import pytest
from click.testing import CliRunner

import cli
import commands.datafetch


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
