"""Loader for the shipped lm-eval task `lambada_rwkv_hf` (see lambada_rwkv_hf.yaml beside it).

lm-eval imports this file by path (`custom_dataset: !function lm_eval_task.load_test_split`), so it
imports only the standard library and `datasets` (an lm-eval dependency). No download: the data is
the jsonl shipped beside it, or `data_file` passed through lm-eval's task metadata.
"""

import json
import os


def load_test_split(data_file=None, **_metadata):
    import datasets

    path = data_file or os.path.join(os.path.dirname(os.path.abspath(__file__)), "lambada_test.jsonl")
    with open(path, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f if line.strip()]
    return {"test": datasets.Dataset.from_dict({"text": texts})}
