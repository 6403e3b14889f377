"""Models for archer.py: the built-in tiny ones and any other from the hub or a local directory.

The tiny models are real transformers models built from small configs (a 2-layer GPT-2 actor,
a 2-layer BERT critic) with a tokenizer trained on the game's text, so the hub path
(from_pretrained) and the tiny path meet the same code everywhere in archer.py. Every
failure a user can cause raises ModelError with a one-line message.
"""
import copy
import os

import torch.nn as nn


class ModelError(ValueError):
    """A model that cannot be loaded or cannot serve in its role; the message is one line."""


def build_tiny_tokenizer(env):
    """A byte-level BPE tokenizer trained on the game's own text, phrase by phrase.

    The text is split into phrases before BPE ("Is it a dog?", " No.", "\n"), not into words,
    and the vocabulary is large enough for every phrase of the game to become one token. A
    question the game knows is then a single token plus the newline, and a 20-turn dialogue
    is ~60 tokens: a 2-layer model can see at a glance which questions were asked and what
    the answers were, which it fails to learn in minutes when questions are 6 word-tokens.
    Byte-level: any other text (a misspelt question, another game's) still encodes, byte by byte.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    phrases = pre_tokenizers.Split(Regex(r"[^?\n]*\?|[^?\n]+|\n"), behavior="isolated")
    tok.pre_tokenizer = pre_tokenizers.Sequence([phrases, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=8192, special_tokens=["<pad>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(env.corpus() if hasattr(env, "corpus") else [env.reset()], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>")


def from_pretrained(name: str, role: str):
    """(model, tokenizer) from a hub name or a local directory, or a one-line ModelError.

    role 'model' loads a causal LM (the actor), 'critic' a bare encoder. The config is read
    first, so a model of the wrong kind is refused before any weight is downloaded: an
    encoder (BERT, RoBERTa...) cannot generate, and an encoder-decoder (T5...) fits neither.
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    if name.startswith((".", "/", "~")) and not os.path.isdir(os.path.expanduser(name)):
        raise ModelError(f"--{role} {name}: no such directory; give a saved model's directory, a hub name or 'tiny'")

    def load(what):
        try:
            return what.from_pretrained(name)
        except (OSError, ValueError) as e:
            raise ModelError(f"could not load {'actor' if role == 'model' else 'critic'} model '{name}' "
                             f"({str(e).splitlines()[0]}); without network access use --{role} tiny or a local directory")

    cfg = load(AutoConfig)
    encoder_only = cfg.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not cfg.is_decoder
    if getattr(cfg, "is_encoder_decoder", False) or (role == "model" and encoder_only):
        need = "a causal language model (GPT-2, Llama...)" if role == "model" else "an encoder (BERT, RoBERTa...) or a causal LM"
        raise ModelError(f"--{role} {name} is a {cfg.model_type} model, which cannot serve here: give {need}")
    tok, model = load(AutoTokenizer), load(AutoModelForCausalLM if role == "model" else AutoModel)
    # Dropout off: the actor's loss must score the distribution that sampled (it is the
    # policy-gradient's premise), and the critic's TD targets should not be noisy on purpose.
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    if tok.pad_token is None:  # GPT-2 / Llama ship without one; any id works, it is masked out
        tok.pad_token = tok.eos_token or tok.unk_token
    if tok.pad_token is None:
        raise ModelError(f"the tokenizer of '{name}' has no pad, eos or unk token to pad with; add one and save it again")
    return model, tok


def load_actor(name: str, env):
    """Return (causal LM, tokenizer). 'tiny' builds a 2-layer, 64-wide GPT-2."""
    from transformers import GPT2Config, GPT2LMHeadModel

    if name == "tiny":
        tok = build_tiny_tokenizer(env)
        # Dropout 0, as for hub models: generation and the loss must see the same distribution.
        cfg = GPT2Config(vocab_size=len(tok), n_layer=2, n_embd=64, n_head=4, n_positions=512,
                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                         bos_token_id=tok.pad_token_id, eos_token_id=tok.pad_token_id)
        model = GPT2LMHeadModel(cfg)
    else:
        model, tok = from_pretrained(name, "model")
    tok.padding_side = "left"  # generation appends on the right, so prompts pad on the left
    tok.truncation_side = "left"  # a too-long dialogue loses its oldest turns, not the newest
    return model, tok


def load_critic_encoder(name: str, actor_tok):
    """Return (encoder, tokenizer). 'tiny' is a 2-layer, 64-wide BERT on the actor's tokenizer."""
    from transformers import BertConfig, BertModel

    if name == "tiny":
        tok = copy.deepcopy(actor_tok)
        cfg = BertConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=256, max_position_embeddings=512, pad_token_id=tok.pad_token_id,
                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        encoder = BertModel(cfg, add_pooling_layer=False)
    else:
        encoder, tok = from_pretrained(name, "critic")
    tok.padding_side = "right"  # the critic reads each text's final real token: pad after it
    tok.truncation_side = "left"
    return encoder, tok


def with_lora(model, rank: int):
    """The actor with its weights frozen and rank-r LoRA adapters on every linear layer, which
    are then all the actor trains (optional: needs the peft package)."""
    try:
        import peft
    except ImportError:
        raise ModelError("--lora-rank needs the peft package: pip install peft (or leave --lora-rank at 0)")
    return peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear"))


def export(policy, critic, out: str):
    """<out>/actor and <out>/critic: the trained actor and the critic's encoder (if the rule has
    a critic), each with its tokenizer, for from_pretrained anywhere (the critic's heads live in checkpoint.pt). LoRA
    adapters are merged into the actor's weights first, so the export needs no peft."""
    if hasattr(policy.model, "merge_and_unload"):
        policy.model = policy.model.merge_and_unload()
    parts = [(policy.model, policy.tok, "actor")] + ([(critic.encoder, critic.tok, "critic")] if critic else [])
    for net, tok, name in parts:
        net.save_pretrained(os.path.join(out, name))
        tok.save_pretrained(os.path.join(out, name))
