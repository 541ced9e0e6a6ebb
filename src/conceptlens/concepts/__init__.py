"""Text-to-Concept (Moayeri et al., ICML 2023) over any vision-language or aligned representation:
alignment (align), concept vocabularies (vocab), concept bottlenecks (cbm), shift diagnosis (shift),
concept-logic search (search), concept-to-text (decode); SpLiCE sparse decompositions (decompose)."""
from .align import Aligner, fit
from .cbm import ConceptBottleneck, run_cbm
from .decode import CaptionMemory, decode, shared_words
from .decompose import ConceptDecomposer, decompose
from .search import ConceptIndex, parse, search, terms_of
from .shift import diagnose, run_diagnose
from .vocab import activations, caption_bank, concept_matrix, default_concepts, load_concepts

__all__ = ["Aligner", "CaptionMemory", "ConceptBottleneck", "ConceptDecomposer", "ConceptIndex", "activations", "caption_bank",
           "concept_matrix", "decode", "decompose", "default_concepts", "diagnose", "fit", "load_concepts", "parse", "run_cbm",
           "run_diagnose", "search", "shared_words", "terms_of"]
