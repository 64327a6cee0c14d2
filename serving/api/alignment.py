"""A request's alignment in the caller's terms: links with offsets into the text it sent (tags counted when it
sent markup), word links, and the output with the source's tags placed."""

from __future__ import annotations

from dataclasses import dataclass

from model_repository.alignment import AlignmentMethod, Link, word_links
from model_repository.markup import Markup, MarkupError, parse, place

from ..domain import AlignRequest, FinishEvent, Source, TokenEvent
from ..errors import InvalidRequest


def method_of(manifest) -> AlignmentMethod:
    """The version's alignment method: the manifest's, or the default for versions exported before it."""
    section = manifest.alignment
    if section is not None:
        return AlignmentMethod.from_dict(section["method"])
    return AlignmentMethod.default(manifest.model.n_decoder_layers, manifest.model.n_heads)


@dataclass(frozen=True)
class AlignmentView:
    plain: str  # the source text the model reads
    markup: Markup | None  # the tags taken out of it, when the caller sent markup
    show: bool  # the caller asked for the links themselves

    @classmethod
    def of(cls, source: Source, alignment: bool, markup: bool) -> tuple[AlignmentView | None, Source]:
        """The view for a request, and the source the model reads (the text without its tags)."""
        if not (alignment or markup):
            return None, source
        if source.text is None:
            raise InvalidRequest("alignment and markup need the source as text (source.text), not token ids")
        if not markup:
            return cls(source.text, None, alignment), source
        try:
            parsed = parse(source.text)
        except MarkupError as e:
            raise InvalidRequest(f"source.text markup: {e}") from None
        if not parsed.plain.strip():
            raise InvalidRequest("source.text holds only markup: there is no text to translate")
        return cls(parsed.plain, parsed, alignment), Source(text=parsed.plain)

    def request(self, method: AlignmentMethod, tokenizer) -> AlignRequest:
        return AlignRequest(method, tuple(tuple(s) for s in tokenizer.spans(self.plain)), self.plain)

    def _sent(self, links: list[Link]) -> list[Link]:
        """Source offsets into the text as sent: with markup, plain-text offsets moved past the tags."""
        if self.markup is None:
            return links
        at = self.markup.offsets
        return [x._replace(source_start=at[x.source_start], source_end=at[x.source_end - 1] + 1) for x in links]

    def token(self, ev: TokenEvent) -> None:
        ev.alignment = self._sent(ev.alignment) if self.show else []

    def finish(self, ev: FinishEvent) -> None:
        links = ev.alignment or []
        if self.markup is not None:
            ev.markup = place(self.markup, ev.text, links)
        if self.show:
            ev.word_alignment = self._sent(word_links(links, self.plain, ev.text))
            ev.alignment, ev.new_links = self._sent(links), self._sent(ev.new_links)
        else:
            ev.alignment, ev.new_links = None, []
