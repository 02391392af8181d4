"""Progress bars: live on a terminal, a line every 30 s in a log file (a redirected run stays readable)."""

import sys

from tqdm.auto import tqdm

from tunelab.runtime import is_main


def bar(**kwargs):
    interactive = sys.stderr.isatty()
    kwargs.setdefault("mininterval", 0.1 if interactive else 30.0)
    kwargs.setdefault("dynamic_ncols", True)
    # One bar for a distributed run: the other processes count the same steps.
    kwargs["disable"] = kwargs.get("disable", False) or not is_main()
    return tqdm(file=sys.stderr, **kwargs)
