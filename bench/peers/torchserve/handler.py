"""TorchServe handler for the `dates` encoder-decoder exported to ONNX: greedy KV-cache decoding of a whole batch,
streaming one message per generated token.

Request body: JSON {"text": "...", "max_new_tokens": 32} (or the plain text). For each batch TorchServe hands in:
one padded encoder pass, then one decoder run per step over the rows still decoding; after each step one
intermediate response per request that produced a token, {"token": "7", "index": 3}. The return value is each
request's last message: {"done": true, "text": "1976-07-04", "generated": 10, "finish": "eos"}.

TorchServe's frontend ends the streams of a batch together: a request that finished early gets its last message
when the whole batch is done.
"""

import json
import os

import numpy as np
import onnxruntime as ort
from ts.handler_utils.utils import send_intermediate_predict_response

DEFAULT_MAX_NEW_TOKENS = 32
N_SPECIALS = 4  # <pad> <bos> <eos> <unk>, ids 0-3
UNK_ID = 3


class DatesStreamingHandler:
    def __init__(self):
        self.initialized = False

    def initialize(self, context):
        model_dir = context.system_properties["model_dir"]
        with open(os.path.join(model_dir, "manifest.json"), encoding="utf-8") as f:
            manifest = json.load(f)
        cfg = manifest["model_config"]
        self.bos_id, self.eos_id, self.max_len = cfg["bos_id"], cfg["eos_id"], cfg["max_len"]
        with open(os.path.join(model_dir, manifest["tokenizer"]), encoding="utf-8") as f:
            tokenizer = json.load(f)
        if tokenizer["kind"] != "char":
            raise ValueError(f"this handler reads character tokenizers only, not {tokenizer['kind']!r}")
        self.vocab = tokenizer["vocab"]
        self.index = {t: i for i, t in enumerate(self.vocab)}

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = 1
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        graphs = manifest["graphs"]
        self.encoder = ort.InferenceSession(os.path.join(model_dir, graphs["encoder"]["file"]), so,
                                            providers=["CPUExecutionProvider"])
        self.decoder = ort.InferenceSession(os.path.join(model_dir, graphs["decoder"]["file"]), so,
                                            providers=["CPUExecutionProvider"])
        self.decoder_outputs = [o.name for o in self.decoder.get_outputs()]
        self.generate([[4, 5, 6]], [2], lambda step: None)  # first runs pay ORT's lazy setup here, not in a request
        self.initialized = True

    # ------------------------------------------------------------------ requests
    @staticmethod
    def parse(request):
        body = request.get("data")
        if body is None:
            body = request.get("body")
        if isinstance(body, (bytes, bytearray)):
            body = body.decode("utf-8")
        if isinstance(body, str):
            try:
                body = json.loads(body)
            except ValueError:
                body = {"text": body}
        if isinstance(body, str):  # a JSON string
            body = {"text": body}
        return str(body.get("text", "")), int(body.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS)

    def encode(self, text):
        return [self.index.get(c, UNK_ID) for c in text][: self.max_len]

    # ------------------------------------------------------------------ decoding
    def generate(self, sources, limits, on_step):
        """Greedy decoding of every source at once. After each step, on_step([(row, token), ...]) with the rows
        that produced a token. Returns each row's tokens and why it stopped ("eos" or "length")."""
        B = len(sources)
        S = max(len(s) for s in sources)
        src_ids = np.zeros((B, S), np.int64)  # (B, S), right-padded with <pad>
        src_mask = np.zeros((B, S), bool)
        for i, s in enumerate(sources):
            src_ids[i, : len(s)] = s
            src_mask[i, : len(s)] = True
        cross_k, cross_v = self.encoder.run(None, {"src_ids": src_ids, "src_mask": src_mask})  # (L, B, nh, S, hs)
        L, _, nh, _, hs = cross_k.shape
        layers = range(L)  # the decoder takes and gives its caches one tensor per layer: past_k.0, present_k.0, ...

        tokens = [[] for _ in range(B)]
        finish = ["length"] * B
        rows = np.arange(B)  # the rows still decoding, in the order of the step's batch
        feed_ids = np.full(B, self.bos_id, np.int64)
        past = {f"past_{kv}.{i}": np.zeros((B, nh, 0, hs), np.float32) for kv in "kv" for i in layers}
        cross = {**{f"cross_k.{i}": cross_k[i] for i in layers}, **{f"cross_v.{i}": cross_v[i] for i in layers},
                 "src_mask": src_mask}
        step = 0
        while len(rows):
            n = len(rows)
            logits, *present = self.decoder.run(self.decoder_outputs, {
                "input_ids": feed_ids, "positions": np.full(n, step, np.int64),
                "self_mask": np.ones((n, step + 1), bool), **past, **cross})
            names = (name.replace("present", "past") for name in self.decoder_outputs[1:])
            past = dict(zip(names, present, strict=True))
            step += 1
            chosen = logits.argmax(axis=1)  # (n,)
            produced, keep = [], []
            for j, row in enumerate(rows):
                token = int(chosen[j])
                if token == self.eos_id:
                    finish[row] = "eos"
                    continue
                tokens[row].append(token)
                produced.append((row, token))
                if len(tokens[row]) < limits[row] and len(tokens[row]) + 1 < self.max_len:
                    keep.append(j)
            if produced:
                on_step(produced)
            if len(keep) < n:  # rows that ended leave the batch: gather the others' caches and sources
                rows, keep = rows[keep], np.asarray(keep, np.int64)
                past = {name: a[keep] for name, a in past.items()}
                cross = {name: a[keep] for name, a in cross.items()}
                chosen = chosen[keep]
            feed_ids = chosen.astype(np.int64)
        return tokens, finish

    def token_text(self, token):
        return self.vocab[token] if N_SPECIALS <= token < len(self.vocab) else ""

    def handle(self, data, context):
        if data is None:
            return None
        parsed = [self.parse(request) for request in data]
        sources = [self.encode(text) for text, _ in parsed]
        limits = [max(0, limit) for _, limit in parsed]
        results = [None] * len(data)
        live = [i for i, s in enumerate(sources) if s and limits[i] > 0]
        for i in set(range(len(data))) - set(live):
            results[i] = ([], "length" if sources[i] else "empty")
        counts = [0] * len(data)

        def stream(produced):
            messages, ids = {}, {}
            for j, token in produced:
                i = live[j]
                messages[i] = json.dumps({"token": self.token_text(token), "index": counts[i]})
                ids[i] = context.request_ids[i]
                counts[i] += 1
            send_intermediate_predict_response(messages, ids, "Intermediate Prediction success", 200, context)

        if live:
            tokens, finish = self.generate([sources[i] for i in live], [limits[i] for i in live], stream)
            for j, i in enumerate(live):
                results[i] = (tokens[j], finish[j])
        out = []
        for i, (toks, why) in enumerate(results):
            # the frontend reads this header on every stream's last message, also when nothing was streamed
            context.set_response_header(i, "ts_stream_next", "false")
            text = "".join(self.token_text(t) for t in toks)
            out.append(json.dumps({"done": True, "text": text, "generated": len(toks), "finish": why}))
        return out
