"""A copy of the repo in a folder with nothing beside it runs the tests that read the repo's data files.

The team's machines keep a design folder next to the checkout (``../shared``); a user's clone has
no such thing. This test copies the repo's tracked files (as they are in the working tree, so an
uncommitted change is tested too) into an empty temporary folder and runs, from that copy and
with only that copy on ``PYTHONPATH``, every test module that reads files under ``tests/data`` or
the package's shipped assets: the key lists of the published model, the reference design doc's
citations, the shipped weights. If any of them reached outside the repo (an absolute path, a
``../`` walk to a sibling folder), it fails here even on a machine where that folder exists,
because the copy's parent holds nothing else.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from repo_files import ROOT, repo_files

#: The modules that read repo data files (grep for tests/data, reference_testdata, assets).
DATA_READING_TESTS = (
    "tests/modules/test_codeformer_head.py",
    "tests/modules/test_maskgit.py",
    "tests/modules/test_reference_codec.py",
    "tests/modules/test_guidance.py",
    "tests/test_reference_doc.py",
    "tests/test_repo_paths.py",
)


def test_a_copy_with_nothing_beside_it_passes_the_data_reading_tests(tmp_path):
    clone = tmp_path / "alone" / "onedc"
    for path in repo_files():
        if not path.is_file():  # tracked but deleted in the working tree
            continue
        target = clone / path.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    assert sorted(p.name for p in clone.parent.iterdir()) == ["onedc"]
    assert not (clone.parent / "shared").exists()
    for test in DATA_READING_TESTS:
        assert (clone / test).is_file(), f"{test} is not a tracked file"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env.update(PYTHONPATH=str(clone), HF_HUB_OFFLINE="1")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", *DATA_READING_TESTS],
        cwd=clone, env=env, capture_output=True, text=True, timeout=600)
    tail = "\n".join(done.stdout.strip().splitlines()[-15:])
    assert done.returncode == 0, f"tests failed in a copy with nothing beside it:\n{tail}\n{done.stderr[-2000:]}"
    assert " passed" in tail and "skipped" not in tail and "deselected" not in tail, tail
    # The copy's own files were the ones imported and read, not this checkout's.
    probe = subprocess.run([sys.executable, "-c", "import onedc, sys; print(onedc.__file__)"],
                           cwd=clone, env=env, capture_output=True, text=True)
    assert Path(probe.stdout.strip()).resolve().is_relative_to(clone.resolve()), probe.stdout
