"""No file of the repo names an absolute path of the machine it was written on.

A clone must work anywhere, so no tracked text file may hold a path of the writer's machine
(its work folder, a user's home folder, its temp folder). The rule is a ban-list of top-level directories
that hold machine- or user-specific files on real machines (:data:`MACHINE_ROOTS`), checked on
every path-like string that starts at the filesystem root. It is deterministic: it does not
depend on which directories exist where the test runs (a placeholder such as ``/data/kodak``
would otherwise fail on a machine that happens to have ``/data``).

Allowed on purpose: placeholder roots in user-facing examples (``/models/...``, ``/data/...``,
``/scratch/...``, ``/path/to/...``), the kernel's ``/dev``, ``/proc`` and ``/sys`` (tests use
``/dev/null`` and ``/proc/self``), URLs (the ``/x`` inside ``https://host/x`` follows a word
character, so it is no root), repo-relative forms (``<run_dir>/tmp``, ``$(VENV)/bin``,
``.gitignore``'s ``/.whl/``) and shebang lines (``#!/usr/bin/env bash``).
"""
from __future__ import annotations

import re

from repo_files import ROOT, read_text, repo_files

#: Top-level directories whose contents are specific to one machine or user: homes, mounts,
#: temp and system trees, container/notebook/HPC work roots. Written without their slash so
#: that this file does not name them as paths itself.
MACHINE_ROOTS = frozenset({
    "work", "workspace", "workspaces", "root", "home", "Users", "tmp", "var", "mnt", "media",
    "srv", "opt", "usr", "etc", "lib", "lib64", "bin", "sbin", "snap", "boot", "run",
    "Volumes", "private", "Library", "System", "Applications",  # macOS
    "content", "kaggle", "gpfs", "lustre", "nfs", "net", "cluster",  # notebooks, clusters
})
#: A path start: "/" not preceded by a character that makes it part of a longer, relative or
#: templated path or of a URL (word chars, ".", "/", "~", ":", "$", "@", "{", "}", "*", "-",
#: ">" of ``<run_dir>/``, ")" of ``$(VENV)/``, "]", and "!" of a shebang).
_ABSOLUTE = re.compile(r"(?<![\w./~:$@{}*\->)\]!])/([A-Za-z0-9_.+-]+)(?=[/\s'\"`),;:\]}>]|$)")
#: The whole path, for the message.
_PATH = re.compile(r"/[^\s'\"`),;\]}>]*")
#: file:// URLs into such a root and Windows user folders are machine paths too.
_FILE_URL = re.compile(r"file://(/[A-Za-z0-9_.+-]+)")
_WINDOWS = re.compile(r"\b[A-Za-z]:[\\/]+(?:Users|Documents and Settings)[\\/]", re.IGNORECASE)


def machine_paths(text: str) -> list[tuple[int, str]]:
    """(line number, path) of every absolute path of a machine in ``text`` (rules: module docstring)."""
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        for match in _ABSOLUTE.finditer(line):
            if match.group(1) in MACHINE_ROOTS:
                found.append((number, _PATH.match(line, match.start()).group(0)))
        for match in _FILE_URL.finditer(line):
            if match.group(1)[1:] in MACHINE_ROOTS:
                found.append((number, match.group(0)))
        found += [(number, m.group(0)) for m in _WINDOWS.finditer(line)]
    return found


def test_rule_flags_machine_paths_and_spares_placeholders():
    """The rule on its own: what it must flag and what it must leave alone."""
    home, temp, work = ("/" + name for name in ("home", "tmp", "work"))
    flagged = [f'REFERENCE = Path("{work}/shared/design/reference")', f"see {home}/alice/data.npz",
               f"cache_dir='{temp}/onedc'", f"root: {temp}", "file://" + work + "/x.png",
               "C:" + "\\Users\\alice\\onedc"]
    for line in flagged:
        assert machine_paths(line), line
    spared = ["onedc import-reference /models/onedc-lmbda4.6 --vae /models/sd-vae/vae",
              "data.root=/data/openimages data.val_root=/data/kodak", "/scratch/onedc/run1",
              "#!/usr/bin/env bash", "open('/dev/null'); Path('/proc/self/status')",
              "https://huggingface.co/home/tmp/work", "<run_dir>/tmp/x", "$(VENV)/bin/python",
              "/.whl/", "runs/tiny/tmp", "x = a /tmpvar", "H/16 x W/16", "~/.cache/onedc"]
    for line in spared:
        assert not machine_paths(line), line


def test_no_tracked_file_names_an_absolute_path_of_a_machine():
    """Every tracked text file: no /<machine root>/... string (see MACHINE_ROOTS)."""
    bad = []
    for path in repo_files():
        text = read_text(path)
        if text is not None:
            bad += [f"{path.relative_to(ROOT)}:{n}: {p}" for n, p in machine_paths(text)]
    assert not bad, ("absolute paths of a machine in the repo (use paths relative to the repo or to "
                     "__file__, tmp_path in tests, or a placeholder such as /data/...):\n" + "\n".join(bad))
