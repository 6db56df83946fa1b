"""A pass for the tune tests, loaded by recipes through `plugins: [tests.tune_passes]`."""

from __future__ import annotations

import os

from compiler.pass_infra import Pass, PassConfig, PassResult, register_pass


class CrashOnceConfig(PassConfig):
    marker: str


@register_pass
class CrashOnce(Pass):
    """Kill the process that runs it the first time (whoever creates the marker file dies); change nothing after.

    Weights-only, so the search's cost-model screen skips it and only a trial's compile runs it.
    """

    name = "crash-once"
    Config = CrashOnceConfig
    kind = "exact"
    weights_only = True

    def run(self, gm, ctx):
        try:
            os.close(os.open(self.config.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return PassResult(gm, modified=False)
        os._exit(17)  # a worker killed mid-trial, as by the OOM killer
