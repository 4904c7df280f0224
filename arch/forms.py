"""The attention-form registry: every value ``LayerSpec.attention`` may take, with its facts.

Each ``attention_*.py`` declares one :class:`~.form_record.AttentionForm` record beside its block;
``ATTENTION_FORMS`` lists them. Accounting, memory estimates, the decoder and ``ModelConfig``'s checks
loop over it. A new form is one file plus one line below - or, from outside the package,
``register_form(MY_FORM)`` before the first ``ModelConfig`` that uses it (docs/extending.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .attention_deltanet import DELTANET
from .attention_gla import GLA
from .attention_gqa import GQA
from .attention_gta import GTA
from .attention_linear import LINEAR
from .attention_mla import MLA
from .form_record import AttentionForm

if TYPE_CHECKING:
    from .config import LayerSpec

ATTENTION_FORMS: dict[str, AttentionForm] = {
    form.name: form for form in (GQA, MLA, GTA, GLA, LINEAR, DELTANET)
}


def register_form(form: AttentionForm) -> AttentionForm:
    """Add ``form`` to the registry (a name may be registered once)."""
    if not isinstance(form, AttentionForm):
        raise TypeError(f"register_form({form!r}): expected an AttentionForm record")
    if form.name in ATTENTION_FORMS and ATTENTION_FORMS[form.name] is not form:
        raise ValueError(f"attention form {form.name!r} is already registered; pick another name")
    ATTENTION_FORMS[form.name] = form
    return form


def unregister_form(name: str) -> None:
    """Remove a form added by :func:`register_form` (tests; the built-in forms stay)."""
    if name in (GQA.name, MLA.name, GTA.name, GLA.name, LINEAR.name, DELTANET.name):
        raise ValueError(f"attention form {name!r} is built in and cannot be removed")
    ATTENTION_FORMS.pop(name, None)


def form_of(spec: LayerSpec) -> AttentionForm:
    """The record of a layer's form (``ModelConfig`` has checked the name)."""
    return ATTENTION_FORMS[spec.attention]


def forms_with(*, field: str | None = None, trait: str | None = None) -> list[str]:
    """Names of the forms that read ``LayerSpec.field`` or implement ``trait``, in registry order."""
    return [
        name
        for name, form in ATTENTION_FORMS.items()
        if (field is None or field in form.layer_fields) and (trait is None or trait in form.traits)
    ]
