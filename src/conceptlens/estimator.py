"""scikit-learn's estimator protocol for our estimators (`Aligner`, `ConceptBottleneck`, `LinearProbe`,
`ConceptDecomposer`): parameters from `__init__`'s signature, `get_params` / `set_params` (so `sklearn.base.clone`,
grid searches and pipelines take them), scikit-learn's tags, `score`, `fit_transform`.

Own base classes rather than scikit-learn's: importing `sklearn.base` pulls in scipy.stats and pandas, about 1 s
of every CLI call that fits a concept bottleneck or a probe. The tags are built by scikit-learn itself, imported
only when scikit-learn asks for them (it is loaded by then). Parity with sklearn.base: tests/test_registry.py.
"""
from __future__ import annotations

import inspect

import numpy as np


class BaseEstimator:
    """get_params / set_params / repr over the parameters that `__init__` names (stored unchanged there)."""

    @classmethod
    def _get_param_names(cls) -> list[str]:
        if cls.__init__ is object.__init__:
            return []
        params = inspect.signature(cls.__init__).parameters.values()
        if any(p.kind == p.VAR_POSITIONAL for p in params):
            raise TypeError(f"{cls.__name__}: estimators take no *args (scikit-learn's convention)")
        return sorted(p.name for p in params if p.name != "self" and p.kind != p.VAR_KEYWORD)

    def get_params(self, deep: bool = True) -> dict:
        out = {}
        for name in self._get_param_names():
            value = getattr(self, name)
            if deep and hasattr(value, "get_params") and not isinstance(value, type):
                out.update((f"{name}__{k}", v) for k, v in value.get_params().items())
            out[name] = value
        return out

    def set_params(self, **params) -> "BaseEstimator":
        valid = self._get_param_names()
        for key, value in params.items():
            name, _, sub = key.partition("__")
            if name not in valid:
                raise ValueError(f"invalid parameter {name!r} for {type(self).__name__}; valid: {', '.join(valid)}")
            if sub:
                getattr(self, name).set_params(**{sub: value})
            else:
                setattr(self, name, value)
        return self

    def __repr__(self) -> str:
        defaults = {p.name: p.default for p in inspect.signature(type(self).__init__).parameters.values()}
        changed = []
        for k, v in self.get_params(deep=False).items():
            try:
                same = bool(v is defaults.get(k) or v == defaults.get(k))
            except (TypeError, ValueError):  # arrays compare element-wise
                same = False
            if not same:
                changed.append(f"{k}={v!r}")
        return f"{type(self).__name__}({', '.join(changed)})"

    def __sklearn_tags__(self):
        from sklearn.utils import Tags, TargetTags
        return Tags(estimator_type=None, target_tags=TargetTags(required=False), transformer_tags=None,
                    regressor_tags=None, classifier_tags=None)


class ClassifierMixin:
    """Classifier tags and `score` (mean accuracy), as sklearn.base.ClassifierMixin."""

    def __sklearn_tags__(self):
        from sklearn.utils import ClassifierTags
        tags = super().__sklearn_tags__()
        tags.estimator_type, tags.classifier_tags = "classifier", ClassifierTags()
        tags.target_tags.required = True
        return tags

    def score(self, X, y) -> float:
        return float(np.mean(self.predict(X) == np.asarray(y)))


class TransformerMixin:
    """Transformer tags and `fit_transform`, as sklearn.base.TransformerMixin."""

    def __sklearn_tags__(self):
        from sklearn.utils import TransformerTags
        tags = super().__sklearn_tags__()
        tags.transformer_tags = TransformerTags()
        return tags

    def fit_transform(self, X, y=None, **fit_params):
        return self.fit(X, **fit_params).transform(X) if y is None else self.fit(X, y, **fit_params).transform(X)
