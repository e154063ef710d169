"""A corpus for the release benchmarks: the tiny test text's lines, numbered, as JSONL.
    python3 bench/make_tiny_corpus.py LINES OUT.jsonl
"""

import json
import sys

lines = [l for l in open("tests/data/tiny_corpus.txt").read().splitlines() if l]
with open(sys.argv[2], "w") as f:
    for i in range(int(sys.argv[1])):
        f.write(json.dumps({"text": f"{lines[i % len(lines)]} {i}"}) + "\n")
