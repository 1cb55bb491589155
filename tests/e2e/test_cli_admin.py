"""`lethe migrate` and `lethe apikey create|list|revoke` as a user runs them (subprocesses)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from e2e_harness import REPO
from sqlalchemy import create_engine, text

from app.services.apikeys import authenticate


def _lethe(var: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LETHE_")}
    env["LETHE_VAR_DIR"] = str(var)
    return subprocess.run([sys.executable, "-m", "app.cli", *args], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=120)


def test_migrate_then_key_lifecycle(tmp_path: Path) -> None:
    var = tmp_path / "var"
    done = _lethe(var, "migrate")
    assert done.returncode == 0, done.stderr
    assert (var / "lethe.db").is_file()

    made = _lethe(var, "apikey", "create", "--name", "gov", "--scopes",
                  "deletions:write,deletions:read")
    assert made.returncode == 0, made.stderr
    key = re.search(r"api key:\s+(lethe_\S+)", made.stdout)
    assert key is not None, made.stdout

    engine = create_engine(f"sqlite:///{var / 'lethe.db'}")
    from sqlalchemy.orm import Session

    with Session(engine) as session:
        principal = authenticate(session, key.group(1))
        assert principal is not None and principal.name == "gov"
        assert principal.allows("deletions:write") and not principal.allows("audit:read")
    with engine.connect() as conn:
        stored = conn.execute(text("SELECT key_hash FROM api_keys WHERE name='gov'")).scalar()
    assert stored and key.group(1) not in stored  # only a digest is stored

    listed = _lethe(var, "apikey", "list")
    assert listed.returncode == 0 and re.search(r"^gov\s.*\s-$", listed.stdout, re.M)
    assert key.group(1) not in listed.stdout

    assert _lethe(var, "apikey", "revoke", "gov").returncode == 0
    with Session(engine) as session:
        assert authenticate(session, key.group(1)) is None
    assert not re.search(r"^gov\s.*\s-$", _lethe(var, "apikey", "list").stdout, re.M)

    bad = _lethe(var, "apikey", "create", "--name", "x", "--scopes", "root")
    assert bad.returncode == 1 and "unknown scopes" in bad.stderr
    engine.dispose()
