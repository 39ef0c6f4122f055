"""Every method's losses, each a pure function of tensors: kd (KD's T²·KL, MLM/CLM cross-entropy, cosine,
perplexity's parts), atkd (ATKD's TKD/DKD split), ted (TED's filters and stage losses; LWD and KD modes)."""

from .kd import IGNORE, check_vocab, clm_loss, cosine_loss, kd_loss, mlm_loss, nll_sum, top1_agreement

__all__ = ["IGNORE", "check_vocab", "clm_loss", "cosine_loss", "kd_loss", "mlm_loss", "nll_sum", "top1_agreement"]
