"""Heads that read a (pruned) backbone's tokens: DPT for dense prediction (:mod:`iared.heads.dpt`)."""

from iared.heads.dpt import DPTConfig, DPTHead, default_depths, from_hf_dpt, head_macs

__all__ = ["DPTConfig", "DPTHead", "default_depths", "from_hf_dpt", "head_macs"]
