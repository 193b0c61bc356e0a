"""`shardgrad demo` prints the dashboard URL and, from a terminal, keeps serving it until
Enter; it never waits without a terminal, nor with --no-wait."""

import json
import os
import pty
import re
import select
import subprocess
import sys
import time
import urllib.request

import pytest

from shardgrad import cli, demo

TIMEOUT = 180


def test_demo_from_a_terminal_serves_the_dashboard_until_enter(tmp_path):
    main, child = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "shardgrad.cli", "demo", "--output-dir", str(tmp_path / "out")],
        stdin=child,
        stdout=child,
        stderr=child,
        cwd=tmp_path,
        env={**os.environ, "OPENBLAS_NUM_THREADS": "1"},
    )
    os.close(child)
    out, deadline = b"", time.monotonic() + TIMEOUT
    try:
        while b"press Enter" not in out:
            assert time.monotonic() < deadline, f"no prompt within {TIMEOUT} s:\n{out[-3000:]!r}"
            assert proc.poll() is None, f"demo exited before the prompt:\n{out[-3000:]!r}"
            if select.select([main], [], [], 1.0)[0]:
                try:
                    out += os.read(main, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
        url = re.search(rb"dashboard: (http://\S+/)", out).group(1).decode()
        # The job is done and the dashboard still answers while the demo waits.
        with urllib.request.urlopen(url + "api/jobs", timeout=10) as r:
            assert json.loads(r.read())["jobs"][-1]["state"] == "done"
        os.write(main, b"\n")
        while proc.poll() is None and time.monotonic() < deadline:
            if select.select([main], [], [], 0.5)[0]:
                try:
                    out += os.read(main, 65536)
                except OSError:
                    break
        assert proc.wait(timeout=max(1, deadline - time.monotonic())) == 0, out[-3000:]
        assert b"[ok] weights digest == `train --local`'s (bitwise)" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        os.close(main)


def test_no_wait_and_no_terminal_never_wait(monkeypatch):
    asked = []
    monkeypatch.setattr("builtins.input", lambda *a: asked.append(a) or "")

    class Tty:
        def isatty(self):
            return True

    class Pipe:
        def isatty(self):
            return False

    monkeypatch.setattr(sys, "stdin", Pipe())
    demo._hold_dashboard("http://127.0.0.1:1/")
    assert not asked  # not a terminal: scripts and CI never wait
    monkeypatch.setattr(sys, "stdin", Tty())
    demo._hold_dashboard(None)
    assert not asked  # no dashboard, nothing to keep up
    demo._hold_dashboard("http://127.0.0.1:1/")
    assert len(asked) == 1

    seen = {}
    monkeypatch.delenv("SHARDGRAD_HTTP", raising=False)
    monkeypatch.setattr(demo, "run_demo", lambda *a, **kw: seen.update(kw) or 0)
    with pytest.raises(SystemExit):
        cli.main(["demo", "--no-wait"])
    assert seen["wait"] is False
    with pytest.raises(SystemExit):
        cli.main(["demo"])
    assert seen["wait"] is True and seen["http"] == "127.0.0.1:0"
