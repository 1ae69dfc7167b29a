"""The reproduction studies, one module each; a module's ``STUDY`` attribute is its
:class:`~normkit.experiments.study.Study`.

Modules are imported only when a study is asked for (:func:`load_study`), so a study that is
missing or broken does not stop the others.
"""

from __future__ import annotations

import importlib

from normkit.experiments.study import Study

__all__ = ["STUDY_NAMES", "StudyUnavailable", "load_study"]

STUDY_NAMES: tuple[str, ...] = (
    "microbatch",
    "depth",
    "domains",
    "revisited",
    "gan",
    "adversarial",
    "nas",
    "style",
)
"""Every study, in the order ``normkit reproduce all`` runs them."""


class StudyUnavailable(Exception):
    """The study's module is missing, fails to import, or has no ``STUDY``."""


def load_study(name: str) -> Study:
    """The ``STUDY`` of ``normkit.experiments.studies.<name>``."""
    module_name = f"{__name__}.{name}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            raise StudyUnavailable(
                f"study {name!r} is not available (no module {module_name})"
            ) from None
        raise StudyUnavailable(f"study {name!r} is not available ({exc})") from exc
    except Exception as exc:  # a broken study must not break the CLI for the others
        raise StudyUnavailable(
            f"study {name!r} is not available (importing it failed: {type(exc).__name__}: {exc})"
        ) from exc
    study = getattr(module, "STUDY", None)
    if not isinstance(study, Study):
        raise StudyUnavailable(f"study {name!r} is not available ({module_name} has no STUDY)")
    return study
