"""minipeft: a minimal Transformer and parameter-efficient fine-tuning, built step by step.

One flat namespace::

    import minipeft as mp
    base = mp.load_base()                      # the pretrained toy model shipped in data/
    task = mp.make_task("rotate", seed=0)
    mp.add_lora(base, r=8, alpha=16)
    mp.train(base, task, steps=400, lr=1e-2)
    mp.evaluate(base, task)
"""
from .model import GPT, GPTConfig, KVCache
from .tasks import (CHARS, DOWNSTREAM_TASKS, PRETRAIN_TASKS, TASKS, CharTokenizer, Task,
                    encode_batch, exact_match, make_task, solve, token_accuracy, tokenizer)
from .train import QUICK, History, budget, default_device, evaluate, train, train_step
from .full import freeze, full_finetune, print_trainable_parameters, trainable_parameters
from .base import FAMILY, FAMILY_DIR, base_report, family_bases, load_base, pretrain, pretrain_family

# --- the methods, each in its own file, listed in one registry (methods.py) ---
from .prompt import PromptTuningConfig, SoftPrompt, add_prompt_tuning
from .prefix import Prefix, PrefixTuning, PrefixTuningConfig, add_prefix_tuning, fold_prefix
from .adapter import AdaptedLinear, Adapter, AdapterConfig, add_adapters, compose_adapters
from .lora import (LoRAAdapter, LoRAConfig, LoRALinear, add_lora, find_targets, linear_layers, lora_layers,
                   merge_lora, subspace_similarity, unload_lora, unmerge_lora)
from .ia3 import IA3Config, IA3Linear, add_ia3, merge_ia3        # beyond the lecture: IA3 and DoRA
from .dora import DoRAConfig, DoRALinear, add_dora, merge_dora
from .methods import (METHODS, active_adapter, adapter_per_row, delete_adapter, disable_adapter, list_adapters,
                      methods_in, set_adapter)
# --- NF4 and QLoRA (nf4.py, qlora.py) ---
from . import nf4
from .qlora import Linear4bit, NF4Config, dequantize_nf4, linear4bit_layers, quantize_nf4
# --- memory (memory.py) ---
from .memory import MemoryBreakdown, SavedTensors, measure_memory, weight_bytes
from .memory_formula import predict_memory
from .presets import PRESETS, ModelShape
# --- data parallel: the same training loop on several processes, DDP's all-reduce counted (distributed.py) ---
from .distributed import DataParallelRun, train_data_parallel
# --- saving and loading adapters (io.py) ---
from .io import (AdapterFileError, BaseMismatchError, base_fingerprint, base_state_dict, load_adapter,
                 read_adapter_config, save_adapter)

# --- experiments: splits, learning-rate search, seeds, intervals, verdicts, the results cache ---
from .protocol import (Paired, RunResult, Search, Summary, grid_search, log_grid, lr_search, paired, print_verdict,
                       run, summary, t975, trainable_percent, verdict)
from .cache import Cache, clear_cache

__version__ = "0.1.0"
