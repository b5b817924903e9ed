"""Packaging: the built wheel ships the twistd plugin file, and a real install makes twistd list both plugins."""

from __future__ import annotations

import os
import shutil
import sys
import zipfile

from twisted.internet import defer, reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from .support import REPO_ROOT, twistd_argv, with_timeout

_SKIP = shutil.ignore_patterns(".git", "_trial_temp*", ".venv*", "build", "dist", "*.egg-info", "__pycache__", "bench")


class PackagingTests(TestCase):
    timeout = 300

    async def build_wheel(self) -> str:
        source = os.path.join(os.path.abspath(self.mktemp()), "src")
        shutil.copytree(REPO_ROOT, source, ignore=_SKIP)
        out = os.path.abspath(self.mktemp())
        stdout, stderr, code = await with_timeout(getProcessOutputAndValue(
            sys.executable,
            ["-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", out, source],
            env=dict(os.environ), path=source, reactor=reactor,
        ), 240, "pip wheel")
        self.assertEqual(code, 0, stderr.decode(errors="replace"))
        (wheel,) = [f for f in os.listdir(out) if f.endswith(".whl")]
        return os.path.join(out, wheel)

    def test_wheel_and_twistd(self):
        """The wheel contains twisted/plugins/p2pchat_plugins.py (without a twisted/plugins/__init__.py),
        and after installing it twistd --help lists p2pdiscovery and p2ppeer."""

        async def run():
            wheel = await self.build_wheel()
            names = zipfile.ZipFile(wheel).namelist()
            self.assertIn("twisted/plugins/p2pchat_plugins.py", names)
            self.assertNotIn("twisted/plugins/__init__.py", names)
            self.assertIn("p2pchat/discovery/store/sqlite.py", names)
            target = os.path.abspath(self.mktemp())
            _, stderr, code = await with_timeout(getProcessOutputAndValue(
                sys.executable, ["-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", target, wheel],
                env=dict(os.environ), reactor=reactor,
            ), 120, "pip install")
            self.assertEqual(code, 0, stderr.decode(errors="replace"))
            # Only the installed copy is importable: not this checkout.
            env = dict(os.environ, PYTHONPATH=target)
            elsewhere = os.path.abspath(self.mktemp())
            os.makedirs(elsewhere)
            argv = twistd_argv()
            out, err, code = await with_timeout(getProcessOutputAndValue(
                argv[0], argv[1:] + ["--help"], env=env, path=elsewhere, reactor=reactor,
            ), 60, "twistd --help")
            listing = out.decode()
            self.assertIn("p2pdiscovery", listing, err.decode(errors="replace"))
            self.assertIn("p2ppeer", listing)

        return defer.Deferred.fromCoroutine(run())
