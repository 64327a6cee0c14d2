"""The seeded fuzzer of bad requests and the loop that sends them and judges the answers."""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from model_repository.markup import MarkupError
from model_repository.markup import parse as parse_markup
from protos.attnserve.v1 import attnserve_pb2 as pb
from serving.domain import Limits

from .common import AUTH, CLIENT_ERRORS, INT32_MAX, INT32_MIN, INT64_MAX, INT64_MIN, REQUESTS, SERVICE, S
from .process import ModelFacts


# ---------------------------------------------------------------------------------------------- the fuzzer
@dataclass(frozen=True)
class Case:
    """One request as bytes, and what the server may answer: `faults` are what the fuzzer planted (empty: a
    request the server should run), `allowed` the status codes that are a right answer to it."""

    index: int
    method: str
    body: bytes
    faults: tuple[str, ...]
    allowed: frozenset[grpc.StatusCode]
    metadata: tuple[tuple[str, str | bytes], ...] = ()
    kind: str = "structured"  # structured | control | random-bytes | bad-utf8 | oversized


# Surrogate-free but exotic: right-to-left text and overrides, combining marks, emoji sequences, NUL, BOM,
# noncharacters, private use, the last plane, CJK, line separators.
EXOTIC = ("\u05e9\u05dc\u05d5\u05dd", "\u0645\u0631\u062d\u0628\u0627", "\u202eevil\u202c", "\u200f", "\u2067x\u2069",
          "e\u0301\u0302\u0303", "Z\u0351\u0352\u0353\u0354", "\U0001f600", "\U0001f469\u200d\U0001f4bb",
          "\U0001f1fa\U0001f1f8", "\U0001f44d\U0001f3fd", "\x00", "\ufeff", "\uffff", "\ufdd0", "\U0010fffd",
          "\ue000", "\u4e2d\u6587", "\u2028", "\x7f", "a", "hello", "3 March 2021", "qwerty")
WHITESPACE = " \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f\x85\xa0\u1680\u2000\u2009\u2028\u2029\u202f\u205f\u3000"
BAD_UTF8 = (b"\xff", b"\xfe\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf", b"\xe2\x82",
            b"\x80", b"\xf8\x88\x80\x80\x80")
META_KEY = "abcdefghijklmnopqrstuvwxyz0123456789-_."
RESERVED_KEYS = {"te", "content-type", "user-agent", "host", "connection", "transfer-encoding", "upgrade",
                 "keep-alive", "proxy-connection", "content-length", "authorization"}


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _ld(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field, by hand (so its payload may be anything, e.g. invalid UTF-8)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _text(rng: random.Random, pieces: int) -> str:
    parts = [rng.choice(EXOTIC) if rng.random() < 0.6 else chr(rng.randrange(0x21, 0x7F)) for _ in range(pieces)]
    text = "".join(parts)
    return text if text.strip() else text + "a"  # whitespace-only is a fault of its own


class _Draw:
    """Draws each field good or bad; a `forced` field is always present and bad; `faults` names the bad ones."""

    def __init__(self, rng: random.Random, forced: str | None, p_bad: float) -> None:
        self.rng, self.forced, self.p_bad, self.faults = rng, forced, p_bad, []

    def __call__(self, name: str, good, bad, present: float = 0.5):
        """(False, None) for an absent field, else (True, a value); `good` and `bad` are lists of values or of
        functions of the rng."""
        rng = self.rng
        if name == self.forced:
            faulty = True
        elif rng.random() >= present:
            return False, None
        else:
            faulty = rng.random() < self.p_bad
        if faulty:
            self.faults.append(name)
        value = rng.choice(bad if faulty else good)
        return True, value(rng) if callable(value) else value


# The fields of each request message the fuzzer draws, by group; the string fields' paths (field numbers) for
# hand-encoded invalid UTF-8: model.name, source.text, options.stop.
FIELDS = {"model": ("model.name", "model.version"),
          "source": ("source",),
          "options": ("options.max_new_tokens", "options.temperature", "options.top_k", "options.top_p",
                      "options.seed", "options.stop"),
          "attention": ("attention.kind", "attention.layers", "attention.heads", "attention.none_with_selection"),
          "beam": ("beam_size",), "alignment": ("alignment", "markup")}
METHOD_FIELDS = {"Generate": ("model", "source", "options", "attention", "alignment"),
                 "Predict": ("model", "source", "options", "attention", "beam", "alignment"),
                 "Encode": ("model", "source"), "GetModelInfo": ("model",), "ListModels": ()}
STRING_FIELDS = {"Generate": ((1, 1), (2, 1), (3, 6)), "Predict": ((1, 1), (2, 1), (3, 6)),
                 "Encode": ((1, 1), (2, 1)), "GetModelInfo": ((1, 1),)}


# What each planted fault is answered with (every other one: INVALID_ARGUMENT, naming the field).
EXPECTED = {"model.name": {S.NOT_FOUND}, "model.version": {S.NOT_FOUND}, "model.name.empty": {S.INVALID_ARGUMENT}}


def long_name(rng: random.Random) -> str:
    """A model name whose echo in a status message, percent-encoded, is over grpc's 16 KiB metadata limit."""
    return rng.choice(["x" * rng.randrange(17_000, 60_000), "\U0001f600" * rng.randrange(1_400, 5_000)])


class Fuzzer:
    """Seeded and reproducible: case `i` of seed `s` is always the same request (`Fuzzer(s, facts).case(i)`)."""

    def __init__(self, seed: int, facts: dict[str, ModelFacts], p_metadata: float = 0.1) -> None:
        self.seed, self.facts, self.p_metadata = seed, facts, p_metadata
        self.limits = Limits()  # beam and stop-string limits are not on the wire; the server runs the defaults

    def cases(self, n: int, start: int = 0) -> Iterator[Case]:
        return (self.case(i) for i in range(start, start + n))

    def case(self, index: int) -> Case:
        """60% field by field (15% of those valid controls), 17% random bytes, 18% invalid UTF-8 in a string
        field, 2.5% metadata over grpc's limit, 2.5% a message over max_message_bytes; 10% of all with junk
        metadata on top."""
        rng = random.Random(f"{self.seed}:{index}")
        r = rng.random()
        if r < 0.6:
            case = self._structured(index, rng)
        elif r < 0.77:
            case = self._random_bytes(index, rng)
        elif r < 0.95:
            case = self._bad_utf8(index, rng)
        elif r < 0.975:
            return self._oversized_metadata(index, rng)
        else:
            case = self._oversized(index, rng)
        if rng.random() < self.p_metadata:
            metadata = self._metadata(rng)
            allowed = case.allowed | (AUTH if any(k == "authorization" for k, _ in metadata) else frozenset())
            case = Case(case.index, case.method, case.body, case.faults, allowed, metadata, case.kind)
        return case

    def _structured(self, index: int, rng: random.Random) -> Case:
        """One field forced bad, each other one bad with p 0.08; or a valid control."""
        method = rng.choice(list(METHOD_FIELDS))
        control = rng.random() < 0.15 or not METHOD_FIELDS[method]
        fields = [f for group in METHOD_FIELDS[method] for f in FIELDS[group]]
        message, faults = self.message(method, rng, None if control else rng.choice(fields), 0.0 if control else 0.08)
        return self._judged(index, method, message.SerializeToString(), tuple(faults),
                            "structured" if faults else "control")

    def _bad_utf8(self, index: int, rng: random.Random) -> Case:
        """A valid message, then one string field again (protobuf merges it in) holding invalid UTF-8."""
        method = rng.choice(list(STRING_FIELDS))
        message, _ = self.message(method, rng, None, 0.0)
        path = rng.choice(STRING_FIELDS[method])
        payload = rng.choice([b"", b"ok"]) + rng.choice(BAD_UTF8) + rng.choice([b"", "\u00e9".encode()])
        for number in reversed(path):
            payload = _ld(number, payload)
        return Case(index, method, message.SerializeToString() + payload, (f"utf8@{path}",),
                    frozenset({S.INVALID_ARGUMENT}), kind="bad-utf8")

    def _oversized_metadata(self, index: int, rng: random.Random) -> Case:
        """Metadata over grpc's 16 KiB hard limit, in one value or many."""
        method = rng.choice(list(REQUESTS))
        body = self.message(method, rng, None, 0.0)[0].SerializeToString() if method in METHOD_FIELDS else b""
        size = rng.randrange(17_000, 40_000)
        metadata = ((f"x-{''.join(rng.choices(META_KEY, k=8))}", "v" * size),) if rng.random() < 0.5 else \
            tuple((f"x-junk-{i}", "v" * 100) for i in range(size // 100))
        return Case(index, method, body, ("oversized-metadata",), frozenset({S.RESOURCE_EXHAUSTED}), metadata,
                    kind="oversized")

    def _oversized(self, index: int, rng: random.Random) -> Case:
        """A valid message grown past max_message_bytes by a long text, name or unknown field."""
        method = rng.choice(["Generate", "Predict", "Encode", "GetModelInfo", "ListModels"])
        body = self.message(method, rng, None, 0.0)[0].SerializeToString()
        limit = max(f.max_message_bytes for f in self.facts.values())
        pad = b"a" * (limit - len(body) + rng.randrange(1, 4096))
        extra = _ld(2, _ld(1, pad)) if method in ("Generate", "Predict", "Encode") else \
            _ld(1, _ld(1, pad)) if method == "GetModelInfo" else _ld(15, pad)
        return Case(index, method, body + extra, ("oversized",), frozenset({S.RESOURCE_EXHAUSTED}), kind="oversized")

    def control(self, index: int, methods: tuple[str, ...] = ("Generate", "Predict", "Encode")) -> Case:
        """A request the server should run (warm-up traffic), from the same distribution of good values."""
        rng = random.Random(f"{self.seed}:control:{index}")
        method = rng.choice(methods)
        message, _ = self.message(method, rng, None, 0.0)
        return self._judged(index, method, message.SerializeToString(), (), "control")

    def _judged(self, index: int, method: str, body: bytes, faults: tuple[str, ...], kind: str) -> Case:
        if faults:  # the code of any one of its faults: the server answers the first it checks
            allowed = frozenset().union(*(EXPECTED.get(f, {S.INVALID_ARGUMENT}) for f in faults))
        elif method in ("Generate", "Predict"):
            # a valid generation may run past a short deadline; a Predict with full attention matrices may be
            # refused as too large for max_message_bytes (RESOURCE_EXHAUSTED, checked by its message)
            allowed = frozenset({S.OK, S.DEADLINE_EXCEEDED, S.RESOURCE_EXHAUSTED})
        else:
            allowed = frozenset({S.OK})
        return Case(index, method, body, faults, allowed, kind=kind)

    def _random_bytes(self, index: int, rng: random.Random) -> Case:
        method = rng.choice(list(REQUESTS))
        if rng.random() < 0.5:
            body = rng.randbytes(rng.randrange(0, 64))
        else:  # protobuf-shaped: tags with random field numbers and wire types (3, 4: groups; 6, 7: invalid)
            out = bytearray()
            for _ in range(rng.randrange(1, 6)):
                number = rng.choice([1, 2, 3, 4, 5, 6, 7, rng.randrange(1, 2**29)])
                wire = rng.choice([0, 0, 1, 2, 2, 2, 3, 4, 5, 6, 7])
                out += _varint(number << 3 | wire)
                if wire == 0:
                    out += _varint(rng.randrange(0, 2**64))
                elif wire in (1, 5):
                    out += rng.randbytes(8 if wire == 1 else 4)
                elif wire == 2:
                    payload = rng.randbytes(rng.randrange(0, 24))
                    out += _varint(len(payload) + rng.choice([0, 0, 0, 1, -1 if payload else 0])) + payload
            body = bytes(out)
        try:
            parsed = REQUESTS[method].FromString(body)
        except Exception:  # protobuf's DecodeError: the server must say INVALID_ARGUMENT
            allowed = frozenset({S.INVALID_ARGUMENT})
        else:  # it parsed: some random request; a random one names a served model only by a miracle
            allowed = CLIENT_ERRORS | {S.OK}
            if method in ("Generate", "Predict") and parsed.model.name in self.facts:
                allowed |= {S.DEADLINE_EXCEEDED}
        if method == "ReloadModels":
            allowed |= AUTH  # refused unless the server has admin tokens, before the body is looked at
        return Case(index, method, body, ("random-bytes",), allowed, kind="random-bytes")

    def _metadata(self, rng: random.Random) -> tuple[tuple[str, str | bytes], ...]:
        """Legal but junk metadata (random keys and values), often with a garbage `authorization`."""
        out: list[tuple[str, str | bytes]] = []
        for _ in range(rng.randrange(0, 5)):
            key = "".join(rng.choice(META_KEY) for _ in range(rng.randrange(1, 24)))
            if key.startswith("grpc-") or key in RESERVED_KEYS:
                key = "x-" + key
            if key.endswith("-bin"):
                out.append((key, rng.randbytes(rng.randrange(0, 40))))
            else:
                out.append((key, "".join(chr(rng.randrange(0x20, 0x7F)) for _ in range(rng.randrange(0, 60)))))
        if not out or rng.random() < 0.5:
            junk = "".join(chr(rng.randrange(0x21, 0x7F)) for _ in range(rng.randrange(0, 80)))
            out.append(("authorization", rng.choice([f"Bearer {junk}", junk, "Bearer", f"Basic {junk}", ""])))
        return tuple(out)

    # ------------------------------------------------------------------ one message, field by field
    def message(self, method: str, rng: random.Random, forced: str | None, p_bad: float):
        draw = _Draw(rng, forced, p_bad)
        cls = REQUESTS[method]
        if method == "ListModels":
            return cls(), []
        name = rng.choice(sorted(self.facts))
        facts = self.facts[name]
        msg = cls(model=self._model(draw, name, facts))
        if method in ("Generate", "Predict", "Encode"):
            self._source(draw, msg.source, facts)
        if method in ("Generate", "Predict"):
            self._options(draw, msg.options, facts)
            self._attention(draw, msg.attention, facts, encoder=method == "Predict")
            self._alignment(draw, msg)
        if method == "Predict":
            ok, beam = draw("beam_size", [0, 1, 2, 3, 4, self.limits.max_beam_size],
                            [-1, self.limits.max_beam_size + 1, 100, INT32_MAX, INT32_MIN])
            msg.beam_size = beam if ok else 0
        return msg, draw.faults

    def _model(self, draw: _Draw, name: str, facts: ModelFacts) -> pb.ModelRef:
        names = [name.upper(), name + " ", " " + name, "../" + name, name + "\x00", "x" * 300,
                 lambda r: _text(r, r.randrange(1, 20)), long_name]
        if len(self.facts) > 1:
            names.append("")  # names no model among several
        _, name = draw("model.name", [name], names, present=1.0)
        if not name:
            draw.faults[-1] = "model.name.empty"  # no name, several models: INVALID_ARGUMENT, not NOT_FOUND
        ok, version = draw("model.version", [0, facts.version], [-1, INT64_MIN, INT64_MAX, facts.version + 1,
                                                                 lambda r: r.randrange(facts.version + 2, INT64_MAX)])
        return pb.ModelRef(name=name, version=version if ok else 0)

    def _source(self, draw: _Draw, source: pb.Source, facts: ModelFacts) -> None:
        vocab, most = facts.src_vocab, facts.max_source_tokens
        bad = [lambda r: ("text", ""), lambda r: ("text", "".join(r.choices(WHITESPACE, k=r.randrange(1, 9)))),
               lambda r: ("text", "b" * r.randrange(most + 1, most + 3000)),
               lambda r: ("ids", []), lambda r: ("ids", [r.randrange(vocab)] * r.randrange(most + 1, most + 50)),
               lambda r: ("ids", [1, r.choice([-1, vocab, vocab + 1, INT32_MAX, INT32_MIN]), 2]),
               lambda r: ("none", None)]
        good = [lambda r: ("text", _text(r, r.randrange(1, 6))),
                lambda r: ("ids", [r.randrange(vocab) for _ in range(r.randrange(1, 13))])]
        _, (kind, value) = draw("source", good, bad, present=1.0)
        if kind == "text":
            source.text = value
        elif kind == "ids":
            source.ids.SetInParent()
            source.ids.ids.extend(value)

    def _alignment(self, draw: _Draw, msg) -> None:
        """alignment and markup: fine with a text source (markup: one whose tags nest around some text); a fault
        with token ids, or with tags that do not nest."""
        rng = draw.rng
        if draw.forced not in FIELDS["alignment"] and rng.random() >= 0.2:
            return
        text = msg.source.text if msg.source.WhichOneof("input") == "text" else None
        if text is None:
            if draw.forced not in FIELDS["alignment"] and rng.random() >= draw.p_bad:
                return  # ids asked for neither: fine
            which = draw.forced if draw.forced in FIELDS["alignment"] else rng.choice(FIELDS["alignment"])
            setattr(msg, which, True)
            draw.faults.append(which)
            return
        msg.alignment = rng.random() < 0.7
        if draw.forced == "markup" or rng.random() < draw.p_bad:
            text = rng.choice(["<b>" + text, text + "</i>", "<b><i>x</b></i>"])
            msg.source.text, msg.markup = text, True
        else:
            msg.markup = rng.random() < 0.5
        if msg.markup:
            try:
                fine = bool(parse_markup(text).plain.strip())
            except MarkupError:
                fine = False
            if not fine:
                draw.faults.append("markup")

    def _options(self, draw: _Draw, o: pb.DecodingOptions, facts: ModelFacts) -> None:
        if not (draw.forced or "").startswith("options.") and draw.rng.random() < 0.3:
            return  # unset
        most, stops = facts.max_new_tokens, self.limits.max_stop_strings
        fields = (("max_new_tokens", [1, 2, 3, 4, 6, 8, lambda r: r.choice([most, 1, 2, 3])],
                   [0, -1, INT32_MIN, most + 1, INT32_MAX]),
                  # float32 on the wire: 0.0009 and 100.01 stay outside [0.001, 100]; 1e-45 is a denormal
                  ("temperature", [0.0, -0.0, 0.001, 0.7, 1.0, 100.0],
                   [float("nan"), float("inf"), -float("inf"), 1e-45, -1e-45, 0.0009, 100.01, 3.4e38, -5.0]),
                  ("top_k", [0, 1, 3, 1000, INT32_MAX], [-1, INT32_MIN]),
                  ("top_p", [1.0, 0.5, 0.99, 1e-45], [0.0, -0.0, float("nan"), float("inf"), 1.0000002, -1.0, 3e38]),
                  ("seed", [0, 1, INT64_MAX, lambda r: r.randrange(INT64_MAX)],
                   [INT64_MAX + 1, 2**64 - 1, lambda r: r.randrange(INT64_MAX + 1, 2**64)]))
        for name, good, bad in fields:
            ok, value = draw(f"options.{name}", good, bad)
            if ok:
                setattr(o, name, value)
        ok, stop = draw("options.stop", [lambda r: [_text(r, r.randrange(1, 4)) for _ in range(r.randrange(1, stops))],
                                         lambda r: ["x" * 2000]],
                        [lambda r: [_text(r, 2) for _ in range(r.randrange(stops + 1, stops + 20))],
                         lambda r: [_text(r, 2), ""]])
        if ok:
            o.stop.extend(stop)

    def _attention(self, draw: _Draw, a: pb.AttentionRequest, facts: ModelFacts, encoder: bool) -> None:
        rng, forced = draw.rng, draw.forced or ""
        if not forced.startswith("attention.") and rng.random() < 0.4:
            return  # unset
        if forced == "attention.none_with_selection" or (not forced.startswith("attention.")
                                                          and rng.random() < draw.p_bad):
            draw.faults.append("attention.none_with_selection")  # kind UNSPECIFIED, yet a selection
            selection = rng.choice(["layers", "heads", "mean"])
            if selection == "mean":
                a.mean_over_heads = True
            else:
                getattr(a, selection).append(0)
            return
        n_layers = min(facts.n_layers) if encoder else facts.n_layers[1]  # Generate sends decoder attention only
        top = max(facts.n_layers)

        def subset(n: int) -> list[int]:
            return rng.sample(range(n), rng.randrange(0, n + 1))

        _, a.kind = draw("attention.kind", [pb.ATTENTION_KIND_CROSS, pb.ATTENTION_KIND_SELF, pb.ATTENTION_KIND_ALL],
                         [4, 5, 99, -1, INT32_MAX, INT32_MIN], present=1.0)
        ok, layers = draw("attention.layers", [lambda r: subset(n_layers)],
                          [lambda r: [*subset(n_layers), r.choice([-1, top, top + 1, INT32_MAX, INT32_MIN])],
                           lambda r: [0, 0]])
        if ok:
            a.layers.extend(layers)
        ok, heads = draw("attention.heads", [lambda r: subset(facts.n_heads)],
                         [lambda r: [*subset(facts.n_heads), r.choice([-1, facts.n_heads, INT32_MAX, INT32_MIN])],
                          lambda r: [1, 1]])
        if ok:
            a.heads.extend(heads)
        a.mean_over_heads = rng.random() < 0.3


# ---------------------------------------------------------------------------------------------- running the fuzz
@dataclass
class FuzzReport:
    tried: int = 0
    kinds: Counter = field(default_factory=Counter)  # structured, control, random-bytes, bad-utf8, oversized
    statuses: Counter = field(default_factory=Counter)  # status code name -> answers
    failures: list[str] = field(default_factory=list)
    failure_kinds: Counter = field(default_factory=Counter)  # "answer: why" -> failures
    health_checks: int = 0
    slowest_refusal: dict = field(default_factory=dict)  # kind -> (seconds, case index), requests with a fault

    def lines(self) -> list[str]:
        return [f"fuzz: {self.tried} requests tried ({', '.join(f'{k} {v}' for k, v in self.kinds.most_common())})",
                f"  statuses: {', '.join(f'{k} {v}' for k, v in self.statuses.most_common())}",
                f"  health checks: {self.health_checks}; slowest refusal by kind: "
                + ", ".join(f"{k} {t * 1000:.0f} ms (case {i})" for k, (t, i) in sorted(self.slowest_refusal.items())),
                f"  failures: {len(self.failures)}",
                *(f"    {n} x {kind}" for kind, n in self.failure_kinds.most_common()),
                *(["  the first ones:"] if self.failures else []), *(f"    {f}" for f in self.failures[:10])]


def _identity(b: bytes) -> bytes:
    return b


def run_fuzz(address: str, cases: Iterable[Case], deadline: float = 5.0, health_every: int = 200,
             report: FuzzReport | None = None) -> FuzzReport:
    """Send every case, one at a time, each with `deadline`; check its answer against what it allows, and health
    (SERVING) every `health_every` requests."""
    report = report or FuzzReport()
    with grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 64 << 20)]) as ch:
        calls = {m: (ch.unary_stream if m == "Generate" else ch.unary_unary)(
            SERVICE + m, request_serializer=_identity, response_deserializer=_identity) for m in REQUESTS}
        health = health_pb2_grpc.HealthStub(ch)
        for case in cases:
            t0 = time.monotonic()
            code, details = _send(calls[case.method], case, deadline)
            took = time.monotonic() - t0
            report.tried += 1
            report.kinds[case.kind] += 1
            report.statuses[code.name] += 1
            if case.faults and code != S.DEADLINE_EXCEEDED:
                report.slowest_refusal[case.kind] = max(report.slowest_refusal.get(case.kind, (0.0, -1)),
                                                        (took, case.index))
            why = _wrong(case, code, details)
            if why:
                report.failures.append(f"case {case.index} ({case.kind} {case.method} {list(case.faults)}, "
                                       f"{took:.2f} s): {code.name} {details[:160]!r}: {why}")
                report.failure_kinds[f"{code.name} {details[:40]!r}...: {why}"] += 1
            if report.tried % health_every == 0:
                report.health_checks += 1
                status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=deadline).status
                if status != health_pb2.HealthCheckResponse.SERVING:
                    report.failures.append(f"after {report.tried} requests health says "
                                           f"{health_pb2.HealthCheckResponse.ServingStatus.Name(status)}")
    return report


def _send(call, case: Case, deadline: float) -> tuple[grpc.StatusCode, str]:
    try:
        answer = call(case.body, timeout=deadline, metadata=case.metadata or None)
        if case.method == "Generate":
            for _ in answer:
                pass
        return S.OK, ""
    except grpc.RpcError as e:
        return e.code(), e.details() or ""


def _wrong(case: Case, code: grpc.StatusCode, details: str) -> str:
    """Why this answer is wrong for this case, or ''."""
    if code not in case.allowed:
        if code == S.DEADLINE_EXCEEDED:
            return "no answer within the deadline: a bad request must be answered at once"
        if code in (S.UNKNOWN, S.INTERNAL):
            return "an internal error for a client's mistake"
        return f"expected one of {sorted(c.name for c in case.allowed)}"
    if case.kind == "bad-utf8" and code == S.INVALID_ARGUMENT and "UTF-8" not in details:
        return "the message does not say UTF-8"
    if code == S.RESOURCE_EXHAUSTED and not case.faults and "max_message_bytes" not in details:
        return "a valid request refused as too large, but the message does not name max_message_bytes"
    return ""


