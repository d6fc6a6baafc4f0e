"""Recompute a checkpoint's manifest, as whoever planted or damaged a file would (it has no key),
so that tests reach the checks behind the manifest's sizes and checksums."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from gossipgrad import checkpoint


def rewrite_manifest(path: Path) -> None:
    manifest = json.loads((path / checkpoint.MANIFEST).read_text())
    for name in manifest["files"]:
        data = (path / name).read_bytes()
        manifest["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (path / checkpoint.MANIFEST).write_text(json.dumps(manifest))
