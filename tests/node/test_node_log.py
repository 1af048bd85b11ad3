"""Node logs: peers' text cannot forge lines or grow a line without bound; files rotate."""

from __future__ import annotations

import logging

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
