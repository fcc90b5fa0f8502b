"""Shared fixtures: a tiny random chat LM, a tiny random BERT encoder and a scripted LLM
client. All build offline in well under a second."""

import json
import os
import re
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from llm import LLMClient  # noqa: E402 (after the path)

SHARED_DATA = os.path.join(ROOT, "..", "shared", "data")
# the device of the LLM tests: cpu here and in CI; DIALOGXPERT_TEST_DEVICE=cuda on a GPU machine
DEVICE = os.environ.get("DIALOGXPERT_TEST_DEVICE", "cpu")
CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
          "{{ message['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def build_tiny_llm(folder, seed=0, vocab_size=None, config_overrides=None):
    """A random Llama-style chat model with a byte-level tokenizer (digits are single
    tokens, so multi-digit labels are multi-token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    specials = ["<|im_start|>", "<|im_end|>", "<pad>"]
    for token in specials:
        vocab[token] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(specials)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>",
                                        pad_token="<pad>", bos_token=None)
    tokenizer.chat_template = CHATML
    torch.manual_seed(seed)
    settings = dict(vocab_size=vocab_size or len(vocab), hidden_size=32,
                    intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=4096,
                    eos_token_id=vocab["<|im_end|>"], pad_token_id=vocab["<pad>"],
                    bos_token_id=None, tie_word_embeddings=False)
    settings.update(config_overrides or {})
    model = LlamaForCausalLM(LlamaConfig(**settings))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_tiny_encoder(folder, seed=0):
    """A random 2-layer BERT with a character vocabulary."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    chars = [chr(c) for c in range(33, 127)]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + ["##" + c for c in chars]
    tokenizer = BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)},
                                  do_lower_case=True)
    torch.manual_seed(seed)
    model = BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=64,
                                 max_position_embeddings=512))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llm_dir(tmp_path_factory):
    return build_tiny_llm(str(tmp_path_factory.mktemp("tiny_llm")))


@pytest.fixture(scope="session")
def tiny_encoder_dir(tmp_path_factory):
    return build_tiny_encoder(str(tmp_path_factory.mktemp("tiny_encoder")))


@pytest.fixture(scope="session")
def tiny_llm(tiny_llm_dir):
    from llm_transformers import TransformersLLM

    return TransformersLLM.from_pretrained(tiny_llm_dir, device=DEVICE, dtype="float32")


class ScriptedLLM(LLMClient):
    """An LLM client whose answers come from Python functions of the prompt text.

    reply(prompt_text) -> str is called once per requested sample;
    prior(prompt_text, labels) -> list of weights, for option_probs."""

    def __init__(self, reply, prior=None):
        super().__init__()
        self.reply = reply
        self.prior = prior
        self.calls = []

    def chat(self, conversations, max_new_tokens=64, temperature=0.0, num_samples=1,
             shared_prefix=True, stop_at_newline=False, cache_keys=None, seeds=None):
        self.calls.append(("chat", len(conversations), num_samples))
        texts = ["\n".join(m["content"] for m in c) for c in conversations]
        return [[self.reply(t) for _ in range(num_samples)] for t in texts]

    def option_probs(self, conversations, labels, cache_keys=None):
        self.calls.append(("option_probs", len(conversations)))
        if self.prior is None:
            return torch.full((len(conversations), len(labels)), 1.0 / len(labels))
        weights = torch.tensor([self.prior(c[-1]["content"], labels) for c in conversations],
                               dtype=torch.float)
        return weights / weights.sum(-1, keepdim=True)


def listed_options(prompt):
    """The numbered options of a planner or critic question, in the order shown."""
    return [match.group(1) for match in re.finditer(r"^\d+\. (.+)$", prompt, re.M)]


def option_number(prompt, option):
    """The number that a planner or critic question shows for an option (its text)."""
    return str(listed_options(prompt).index(option) + 1)


def write_json_lines(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
