"""Node logs: fields on every line, text and JSON, typed events; peers' text cannot forge
lines or grow a line without bound; files rotate."""

from __future__ import annotations

import errno
import io
import json
import logging
import re
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

import node.logs
from node.daemon import MAX_LOG_LINE, NodeLog, clean_log_text


def test_control_characters_are_escaped_so_no_text_forges_a_second_line():
    # Execute
    text = clean_log_text("refused tensor 'w\n[miner-0 r3] all good\r\x00' ε")
    # Assert
    assert "\n" not in text and "\r" not in text and "\x00" not in text
    assert "\\x0a[miner-0 r3]" in text and text.endswith("' ε")


def test_a_long_line_is_cut_and_says_how_much_was_cut():
    # Execute
    text = clean_log_text("x" * (MAX_LOG_LINE + 5_000))
    # Assert
    assert text.startswith("x" * MAX_LOG_LINE)
    assert text.endswith("... (5000 more characters)")
    assert len(text) < MAX_LOG_LINE + 40


def test_the_log_file_rotates_and_keeps_a_bounded_number_of_old_files(tmp_path, monkeypatch):
    # Prepare: small files, so that a flood of long lines rotates several times
    monkeypatch.setattr(node.logs, "MAX_LOG_BYTES", 20_000)
    log_file = tmp_path / "log"
    log = NodeLog("rotation-test-node", log_file)
    try:
        # Execute
        for _ in range(500):
            log.warning("name " + "A" * 10_000)
        # Assert: the current file and LOG_BACKUPS old ones, each bounded
        files = sorted(tmp_path.iterdir())
        assert [f.name for f in files] == ["log", "log.1", "log.2", "log.3"]
        assert all(f.stat().st_size <= 20_000 + 2 * MAX_LOG_LINE for f in files)
    finally:
        for handler in logging.getLogger("llbcfl.rotation-test-node").handlers:
            handler.close()


def test_refusals_of_outsiders_cost_one_line_per_period(tmp_path, monkeypatch):
    # Prepare: a clock the test moves
    now = [1000.0]
    monkeypatch.setattr(node.logs.time, "monotonic", lambda: now[0])
    log_file = tmp_path / "log"
    log = NodeLog("outsider-test-node", log_file)
    # Execute: 100 refusals at once, then one more a period later
    for _ in range(100):
        log.refused_outsider("refused an unsigned stream")
    now[0] += node.logs.OUTSIDER_LOG_SECONDS
    log.refused_outsider("refused an unsigned stream")
    # Assert: two lines; the second counts the 99 not logged
    lines = log_file.read_text().splitlines()
    assert len(lines) == 2
    assert lines[1].endswith("refused an unsigned stream (99 more such refusals not logged)")


# Fields and formats ------------------------------------------------------------------


def json_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_text_line_names_node_round_view_and_height(tmp_path: Path) -> None:
    # Prepare
    log_file = tmp_path / "log"
    log = NodeLog("text-fields-node", log_file, role="miner")
    log.round, log.view, log.height = 3, 1, 12
    # Execute
    log.warning("view change: view 0 -> 1", event="view-change")
    log.info("plain")
    # Assert: local time, the bracket of fields, the level of warnings and errors
    first, second = log_file.read_text().splitlines()
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} \[text-fields-node r3 v1 h12\] "
        r"WARNING view change: view 0 -> 1",
        first,
    )
    assert second.endswith("[text-fields-node r3 v1 h12] plain")


def test_a_json_line_holds_every_field_and_the_event(tmp_path: Path) -> None:
    # Prepare
    log_file = tmp_path / "log"
    log = NodeLog("json-fields-node", log_file, role="server", log_format="json")
    log.round, log.view, log.height = 2, 5, 40
    # Execute
    log.warning("reached 1 of 4 miners", event="no-quorum")
    log.height = 41
    log.info("test accuracy 0.9")
    # Assert
    warning, info = json_lines(log_file)
    assert set(warning) == {
        "ts",
        "level",
        "node",
        "role",
        "round",
        "view",
        "height",
        "event",
        "msg",
    }
    assert warning["level"] == "warning" and warning["event"] == "no-quorum"
    assert (warning["node"], warning["role"]) == ("json-fields-node", "server")
    assert (warning["round"], warning["view"], warning["height"]) == (2, 5, 40)
    assert warning["msg"] == "reached 1 of 4 miners"
    stamp = datetime.fromisoformat(warning["ts"].replace("Z", "+00:00"))
    assert warning["ts"].endswith("Z") and stamp.utcoffset() == timedelta(0)
    assert abs(stamp.timestamp() - time.time()) < 60
    assert "event" not in info and info["height"] == 41 and info["level"] == "info"


def test_a_message_with_line_breaks_stays_one_valid_json_line(tmp_path: Path) -> None:
    # Prepare: peers' text with every kind of line break and a forged JSON object
    log_file = tmp_path / "log"
    log = NodeLog("json-escape-node", log_file, log_format="json")
    forged = '"}\n{"node": "miner-0", "msg": "all good"}\r\x85\u2028\u2029\x1b[2J\x9b ε'
    # Execute
    log.warning(f"refused tensor {forged}")
    # Assert: one line (by any reading of line breaks), the message intact
    raw = log_file.read_text()
    assert raw.count("\n") == 1 and len(raw.splitlines()) == 1
    (line,) = json_lines(log_file)
    assert line["msg"] == f"refused tensor {forged}" and line["node"] == "json-escape-node"


def test_a_long_json_message_is_cut(tmp_path: Path) -> None:
    # Prepare
    log_file = tmp_path / "log"
    log = NodeLog("json-long-node", log_file, log_format="json")
    # Execute
    log.info("\n" * (MAX_LOG_LINE + 5_000))
    # Assert: bounded even where each character escapes to two
    (line,) = json_lines(log_file)
    assert line["msg"] == "\n" * MAX_LOG_LINE + "... (5000 more characters)"
    assert len(log_file.read_text()) < 3 * MAX_LOG_LINE


def test_text_lines_escape_unicode_line_separators_too() -> None:
    # Execute
    text = clean_log_text("a\u2028[miner-0 r3 v0 h1] b\x85c")
    # Assert: nothing str.splitlines breaks on is left
    assert len(text.splitlines()) == 1
    assert "\\u2028[miner-0" in text and "\\x85c" in text


def test_a_traceback_stays_inside_the_json_line(tmp_path: Path) -> None:
    # Prepare
    log_file = tmp_path / "log"
    log = NodeLog("json-trace-node", log_file, log_format="json")
    # Execute
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        log.exception("handler failed")
    # Assert
    (line,) = json_lines(log_file)
    assert line["level"] == "error" and line["msg"] == "handler failed"
    assert line["exc"].startswith("Traceback") and "ValueError: bad\nthing" in line["exc"]


def test_an_unknown_log_format_is_refused() -> None:
    with pytest.raises(ValueError, match="not one of text, json"):
        NodeLog("format-test-node", log_format="xml")


def test_hosted_clients_log_through_their_process_with_its_view_and_height(
    tmp_path: Path,
) -> None:
    # Prepare: the client process's log and two hosted identities
    log_file = tmp_path / "log"
    host = NodeLog("clients(2)-child-test", log_file, role="client", log_format="json")
    first, second = host.child("client-child-1"), host.child("client-child-2")
    first.round = 4
    # Execute: the process's follower moves view and height on
    host.view, host.height = 1, 30
    first.info("update sent to 4 of 4 miners")
    second.info("declines")
    # Assert: one file; each line with its own node and round, the shared position
    a, b = json_lines(log_file)
    assert (a["node"], a["role"], a["round"], a["view"], a["height"]) == (
        "client-child-1",
        "client",
        4,
        1,
        30,
    )
    assert (b["node"], b["round"], b["height"]) == ("client-child-2", 0, 30)


class FullStream(io.StringIO):
    """A stream on a disk that is full until ``room`` is set."""

    room = False

    def write(self, text: str) -> int:
        if not self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(text)


def test_the_lines_a_full_disk_lost_are_counted_in_a_json_line(monkeypatch) -> None:
    # Prepare: the node logs to a stderr on a full disk
    stream = FullStream()
    monkeypatch.setattr(sys, "stderr", stream)
    log = NodeLog("json-full-disk-node", log_format="json")
    log.round = 7
    # Execute: three lines lost, then one that fits
    for _ in range(3):
        log.warning("lost", event="peer-lost")
    stream.room = True
    log.info("after")
    # Assert: the count first, as a node line of its own (no event), then the line
    note, after = (json.loads(line) for line in stream.getvalue().splitlines())
    assert note["msg"] == "up to 3 log line(s) lost: the disk was full"
    assert note["node"] == "json-full-disk-node" and note["round"] == 7 and "event" not in note
    assert after["msg"] == "after"
