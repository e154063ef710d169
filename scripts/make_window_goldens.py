"""Golden context windows from SAELens's concat_and_batch_sequences, the packing its
ActivationsStore applies to a text dataset (begin_batch_token_id = BOS when prepend_bos,
begin_sequence_token_id None, separator BOS), in both modes; data/context_windows.h follows it.
    .venv/bin/python scripts/make_window_goldens.py   ->  tests/goldens/context_windows.json
"""

import json
import pathlib

import torch
from sae_lens.tokenization_and_batching import concat_and_batch_sequences

ROOT = pathlib.Path(__file__).resolve().parent.parent
BOS = 2

# Documents chosen for the edge cases: starting with BOS, longer than a window, filling a window
# exactly, a window one short of full (the separator fills it), empty.
DOCS = [[10, 11, 12], [BOS, 20, 21], list(range(30, 43)), [50], [], [60, 61, 62, 63],
        [70, 71], [BOS], list(range(80, 87)), [90, 91, 92]]


def main() -> None:
    cases = []
    for context_size in (4, 5, 8):
        for prepend_bos in (True, False):
            for separator in (BOS, None):
                for disable_concat in (False, True):
                    windows = concat_and_batch_sequences(
                        iter(torch.tensor(d, dtype=torch.long) for d in DOCS),
                        context_size=context_size,
                        begin_batch_token_id=BOS if prepend_bos else None,
                        begin_sequence_token_id=None,
                        sequence_separator_token_id=separator,
                        disable_concat_sequences=disable_concat)
                    cases.append(dict(context_size=context_size, prepend_bos=prepend_bos,
                                      separator=separator, concat=not disable_concat,
                                      windows=[w.tolist() for w in windows]))
    out = ROOT / "tests" / "goldens" / "context_windows.json"
    out.write_text(json.dumps({"bos": BOS, "docs": DOCS, "cases": cases}, indent=None) + "\n")
    print(f"{out}: {len(cases)} cases")


if __name__ == "__main__":
    main()
