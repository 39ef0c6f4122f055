"""TED (Liang et al., ICML 2023) as commands: stages (finetune, stage 1, stage 2 as Methods on the one
trainer; filter files; evaluation) and cli (the ``ted`` command). Its losses: objectives/ted.py."""
