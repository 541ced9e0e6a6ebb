"""Text-to-Concept (Moayeri et al., ICML 2023) over any vision-language or aligned representation:
alignment (align), concept vocabularies (vocab), concept bottlenecks (cbm), shift diagnosis (shift),
concept-logic search (search), concept-to-text (decode); SpLiCE sparse decompositions (decompose).
Names load with their submodule on first use (conceptlens.lazy)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_package

_EXPORTS = {"Aligner": "align", "fit": "align", "ConceptBottleneck": "cbm", "run_cbm": "cbm",
            "CaptionMemory": "decode", "decode": "decode", "shared_words": "decode",
            "ConceptDecomposer": "decompose", "decompose": "decompose",
            "ConceptIndex": "search", "parse": "search", "search": "search", "terms_of": "search",
            "diagnose": "shift", "run_diagnose": "shift",
            "activations": "vocab", "caption_bank": "vocab", "concept_matrix": "vocab", "default_concepts": "vocab",
            "load_concepts": "vocab"}
__all__ = ["Aligner", "CaptionMemory", "ConceptBottleneck", "ConceptDecomposer", "ConceptIndex", "activations",
           "caption_bank", "concept_matrix", "decode", "decompose", "default_concepts", "diagnose", "fit",
           "load_concepts", "parse", "run_cbm", "run_diagnose", "search", "shared_words", "terms_of"]
lazy_package(__name__, _EXPORTS)

if TYPE_CHECKING:
    from .align import Aligner, fit
    from .cbm import ConceptBottleneck, run_cbm
    from .decode import CaptionMemory, decode, shared_words
    from .decompose import ConceptDecomposer, decompose
    from .search import ConceptIndex, parse, search, terms_of
    from .shift import diagnose, run_diagnose
    from .vocab import activations, caption_bank, concept_matrix, default_concepts, load_concepts
