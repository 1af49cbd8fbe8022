"""minipeft: a minimal Transformer and parameter-efficient fine-tuning, built step by step.

One flat namespace::

    import minipeft as mp
    base = mp.load_base()
    task = mp.make_task("rotate", seed=0)
"""
from .model import GPT, GPTConfig, KVCache
from .tasks import (CHARS, DOWNSTREAM_TASKS, PRETRAIN_TASKS, TASKS, CharTokenizer, Task,
                    encode_batch, exact_match, make_task, solve, token_accuracy, tokenizer)
from .train import QUICK, History, budget, default_device, evaluate, train
from .full import freeze, full_finetune, print_trainable_parameters, trainable_parameters
from .base import base_report, load_base, pretrain

__version__ = "0.1.0"
