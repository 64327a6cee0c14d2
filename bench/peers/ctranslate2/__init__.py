"""CTranslate2 peer: a Marian model on CTranslate2, for comparison only (`python -m bench.peers.ctranslate2.run`)."""
