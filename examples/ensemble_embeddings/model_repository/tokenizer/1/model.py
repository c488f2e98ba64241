"""Tokenizer step of the embeddings ensemble (Triton Python-backend API).

BERT-style: lower-case, split on whitespace and punctuation, then greedy
longest-match WordPiece against ``vocab.txt`` (continuation pieces start with
``##``; a word that cannot be split becomes ``[UNK]``). Each text becomes
``[CLS] ... [SEP]`` truncated to ``MAX_LENGTH``; the texts of one request are
padded with ``[PAD]`` (id 0, mask 0) to the longest of them.
"""

import json
import os
import re

import numpy as np

import triton_python_backend_utils as pb_utils

_WORDS = re.compile(r"\w+|[^\w\s]", re.UNICODE)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.max_length = int(config.get("parameters", {}).get("MAX_LENGTH", {}).get("string_value", "128"))
        with open(os.path.join(args["model_repository"], "vocab.txt"), encoding="utf-8") as handle:
            self.vocab = {line.rstrip("\n"): index for index, line in enumerate(handle)}
        self.pad, self.unk = self.vocab["[PAD]"], self.vocab["[UNK]"]
        self.cls, self.sep = self.vocab["[CLS]"], self.vocab["[SEP]"]

    def wordpiece(self, word):
        pieces, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.vocab:
                    pieces.append(self.vocab[piece])
                    break
                end -= 1
            else:
                return [self.unk]
            start = end
        return pieces

    def encode(self, text):
        ids = [self.cls]
        for word in _WORDS.findall(text.lower()):
            ids.extend(self.wordpiece(word))
        return ids[: self.max_length - 1] + [self.sep]

    def execute(self, requests):
        responses = []
        for request in requests:
            texts = pb_utils.get_input_tensor_by_name(request, "TEXT").as_numpy().reshape(-1)
            try:
                encoded = [self.encode(bytes(text).decode("utf-8")) for text in texts]
            except UnicodeDecodeError as exc:
                error = pb_utils.TritonError(f"TEXT is not valid UTF-8: {exc}", pb_utils.TritonError.INVALID_ARG)
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=error))
                continue
            length = max(len(ids) for ids in encoded)
            input_ids = np.full((len(encoded), length), self.pad, dtype=np.int64)
            mask = np.zeros((len(encoded), length), dtype=np.int64)
            for row, ids in enumerate(encoded):
                input_ids[row, : len(ids)] = ids
                mask[row, : len(ids)] = 1
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("INPUT_IDS", input_ids), pb_utils.Tensor("ATTENTION_MASK", mask)]))
        return responses

    def finalize(self):
        pass
