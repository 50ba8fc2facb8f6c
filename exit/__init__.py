"""exit: DyVTE visual-token exit, built on what ``analysis`` records.

Use ``from exit import ...`` rather than ``import exit``, which would shadow the ``exit`` builtin
in the importing module. Gates, surgery, the label sweep and the baselines are planned here
(see the project's open issues); this package has no public API yet.
"""

__all__: list[str] = []
