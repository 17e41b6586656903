"""Library progress bars off where nobody watches them.

transformers and huggingface_hub draw tqdm bars of their own ("Loading weights", "Writing model
shards", GGUF conversion, downloads) on stderr whether or not it is a terminal: in a sweep
worker's log (workers.log), a bench child's captured stderr or a redirected run they are only
noise. The harness's own bars (tqdm.auto in train.py, sft.py, reference.py) and the sweep's rich
view are untouched: they are plain tqdm and rich, not the libraries' wrappers.
"""

from __future__ import annotations

import os
import sys

# huggingface_hub reads it when imported, and transformers' bars follow hub's setting then: set
# here, it also reaches every process started from this one (spawned sweep workers, bench children).
ENV = "HF_HUB_DISABLE_PROGRESS_BARS"


def quiet_libraries(force: bool = False) -> None:
    """Turn transformers' and huggingface_hub's progress bars off in this process and its future
    children, when stderr is not a terminal or `force` (a sweep worker: the harness's view is
    what is watched). HF_HUB_DISABLE_PROGRESS_BARS set by the user wins: 0 keeps the bars."""
    if ENV in os.environ:
        return
    stderr = sys.stderr
    if not force and stderr is not None and stderr.isatty():
        return
    os.environ[ENV] = "1"
    # Already imported, they have read the environment: tell them (cheap once they are loaded).
    if "transformers" in sys.modules:
        from transformers.utils import logging

        logging.disable_progress_bar()  # hub's too
    elif "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
