"""Bring your own model: small GPT-2 and Llama-style models built from configs (random weights, a tokenizer trained
here), fine-tuned with the L2 regularizer, then datastore and kNN-LM evaluation through the same commands."""

import json
import shutil

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from conftest import TINY, knnlm  # noqa: E402
from knnlm.data import load_corpus  # noqa: E402

LINES_TRAIN, LINES_EVAL = 1200, 150


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    """A small word-level corpus cut from WikiText-2's training split."""
    folder = tmp_path_factory.mktemp("corpus")
    src = load_corpus().folder / "wiki.train.tokens"
    lines = src.read_text(encoding="utf-8").splitlines()
    (folder / "train.txt").write_text("\n".join(lines[:LINES_TRAIN]) + "\n")
    (folder / "valid.txt").write_text("\n".join(lines[LINES_TRAIN : LINES_TRAIN + LINES_EVAL]) + "\n")
    (folder / "test.txt").write_text("\n".join(lines[LINES_TRAIN + LINES_EVAL : LINES_TRAIN + 2 * LINES_EVAL]) + "\n")
    yield folder
    shutil.rmtree(folder)  # module-scoped folders go with their module: CI's disk is not large


def make_model(kind, corpus_dir, folder):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator((corpus_dir / "train.txt").read_text().splitlines(),
                            trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<eos>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")
    fast.save_pretrained(folder)
    V, eos = len(fast), fast.eos_token_id
    torch.manual_seed(0)
    if kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                           bos_token_id=eos, eos_token_id=eos))
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                                             bos_token_id=eos, eos_token_id=eos, pad_token_id=eos))
    model.save_pretrained(folder)
    return folder


@pytest.mark.slow  # a fine-tune and a full pipeline per model family
@pytest.mark.parametrize("kind,module", [("gpt2", "transformer.h.1.mlp"), ("llama", "model.layers.1.mlp")])
def test_finetune_datastore_evaluate_hf(kind, module, corpus_dir, tmp_path):
    base = make_model(kind, corpus_dir, tmp_path / "base")
    run = tmp_path / "run"
    args = [f"data.path={corpus_dir}", f"model.hf_path={base}", "model.context=32", "train.omega=0.01",
            "train.epochs=1", "train.batch_size=8", "train.lr=1e-3", "train.warmup_steps=2", "train.eval_tokens=2000",
            "eval.k_max=16", "eval.k=4,16", "data.max_train_tokens=0", "data.max_eval_tokens=0"]
    knnlm("run", "--config", TINY, "--out", run, *args)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(m.get("reg_loss", 0) > 0 for m in metrics)  # the L2 term was computed and logged

    # the fine-tuned model comes back in Hugging Face format and differs from the base
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tuned = AutoModelForCausalLM.from_pretrained(run / "hf", local_files_only=True).eval()
    AutoTokenizer.from_pretrained(run / "hf", local_files_only=True)
    original = AutoModelForCausalLM.from_pretrained(base, local_files_only=True)
    name, p = next(iter(tuned.named_parameters()))
    assert not torch.equal(p, dict(original.named_parameters())[name])

    summary = json.loads((run / "eval" / "valid" / "summary.json").read_text())
    assert summary["words"] < summary["tokens"]  # subword tokens: more tokens than words
    assert np.isclose(np.log(summary["lm_word_ppl"]) * summary["words"], np.log(summary["lm_ppl"]) * summary["tokens"])

    # the Python API on the same run folder: scores agree with the evaluation of valid, generation runs
    from knnlm.api import load as load_run

    api = load_run(run)
    scored = api.score((corpus_dir / "valid.txt").read_text(encoding="utf-8"))
    np.testing.assert_allclose(scored.lm, np.load(run / "eval" / "valid" / "lm_logprobs.npy"), atol=1e-4)
    assert scored.ppl == pytest.approx(summary["knnlm_ppl"], rel=1e-4)
    assert abs(float(torch.logsumexp(api.next_token_logprobs("the game"), 0))) < 1e-5
    assert api.generate("the game", max_tokens=3, greedy=True) == api.generate("the game", max_tokens=3, top_k=1, seed=1)

    # datastore keys = the input of the last MLP, read directly from the model with our own hook
    from knnlm.hf import load_hf_corpus

    ids = load_hf_corpus(corpus_dir, str(base)).splits["train"]
    eos = AutoTokenizer.from_pretrained(base, local_files_only=True).eos_token_id
    x = torch.tensor([[eos, *ids[:31]]])
    seen = {}
    tuned.get_submodule(module).register_forward_pre_hook(lambda m, a: seen.setdefault("key", a[0]))
    with torch.no_grad():
        tuned(x)
    keys = np.load(run / "datastore" / "keys.npy", mmap_mode="r")
    vals = np.load(run / "datastore" / "vals.npy")
    assert np.array_equal(vals[:32], ids[:32])  # key t ↔ token t+1 with subword ids
    direct = seen["key"][0].numpy()
    err = np.abs(np.asarray(keys[:32], dtype=np.float32) - direct).max() / np.abs(direct).max()
    assert err < 0.03, err  # datastore keys are bf16-computed, stored as fp16


def test_moco_momentum_copy_of_a_hf_model_captures_its_own_keys(corpus_dir, tmp_path):
    from knnlm.config import ModelConfig
    from knnlm.hf import HFCausalLM
    from knnlm.regularizers import MocoRegularizer

    base = make_model("gpt2", corpus_dir, tmp_path / "base")
    model = HFCausalLM(ModelConfig(hf_path=str(base), context=16))
    moco = MocoRegularizer(model, model.vocab_size, model.key_dim, queue_len=2, momentum=0.5)
    with torch.no_grad():  # make the two encoders differ, so each one's key is recognisable
        for p in moco.momentum_encoder.encoder.parameters():
            p.mul_(0.5)
    x = torch.randint(0, 50, (1, 16))
    y = torch.arange(16)[None]
    own = model(x).key
    moco.after_step(model, x, y)  # EMA step, then the copy encodes x
    copy_key = moco.momentum_encoder.encoder(x).key
    assert not torch.allclose(own, copy_key)
    assert torch.allclose(moco.queue.keys[torch.arange(16), 0], copy_key[0])
    assert torch.equal(model(x).key, own)  # the original's hook still feeds the original


@pytest.mark.slow
def test_a_hub_id_is_read_from_the_local_hugging_face_cache(corpus_dir, tmp_path):
    """`model.hf_path=org/name` resolves from $HF_HOME's hub cache (the layout `huggingface_hub` writes), offline."""
    import subprocess
    import sys

    snapshot = tmp_path / "hf" / "hub" / "models--tiny-org--tiny-gpt2" / "snapshots" / "0123abcd"
    make_model("gpt2", corpus_dir, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0123abcd")
    code = ("from knnlm.config import ModelConfig; from knnlm.hf import HFCausalLM, load_tokenizer; "
            "m = HFCausalLM(ModelConfig(hf_path='tiny-org/tiny-gpt2', context=32)); "
            "print(m.vocab_size, len(load_tokenizer('tiny-org/tiny-gpt2')))")
    env = {**__import__("os").environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["400", "400"]
    env["HF_HOME"] = str(tmp_path / "empty")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode != 0 and "no Hugging Face" in proc.stderr


@pytest.mark.slow
def test_pickled_weights_are_refused_unless_allowed(corpus_dir, tmp_path):
    """A pytorch_model.bin is a pickle (loading it can run code): read only with model.hf_allow_pickle=true."""
    from knnlm.artifacts import UserError
    from knnlm.config import ModelConfig
    from knnlm.hf import HFCausalLM

    folder = make_model("gpt2", corpus_dir, tmp_path / "m")
    from transformers import AutoModelForCausalLM

    (tmp_path / "bin").mkdir()
    torch.save(AutoModelForCausalLM.from_pretrained(folder).state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    for f in folder.iterdir():  # config and tokenizer: everything but the safetensors weights
        if f.suffix != ".safetensors":
            (tmp_path / "bin" / f.name).write_bytes(f.read_bytes())
    assert not list((tmp_path / "bin").glob("*.safetensors")) and list((tmp_path / "bin").glob("*.bin"))
    with pytest.raises(UserError, match="safetensors only"):
        HFCausalLM(ModelConfig(hf_path=str(tmp_path / "bin"), context=32))
    model = HFCausalLM(ModelConfig(hf_path=str(tmp_path / "bin"), context=32, hf_allow_pickle=True))
    assert model.vocab_size == HFCausalLM(ModelConfig(hf_path=str(folder), context=32)).vocab_size


@pytest.mark.slow
def test_hugging_face_generate_with_the_knn_logits_processor_equals_knnlm_generate(corpus_dir, tmp_path):
    from knnlm.api import load as load_run
    from knnlm.data import token_stream
    from knnlm.hf import KNNLogitsProcessor

    base = make_model("gpt2", corpus_dir, tmp_path / "base")
    run = tmp_path / "run"
    knnlm("run", "--config", TINY, "--out", run, f"data.path={corpus_dir}", f"model.hf_path={base}",
          "model.context=32", "train.epochs=0", "eval.k_max=16", "eval.k=4,16", "data.max_eval_tokens=2000")
    lm = load_run(run, lmbda=0.5)
    lm.bf16 = False  # as Hugging Face's generate runs: fp32
    prompt = list(lm.encode("the game was", close_last_line=False))
    ours = lm.generate_ids([prompt], 12, greedy=True, stop_at_eos=True)[0]
    assert ours == lm.generate_ids([prompt], 12, greedy=True, stop_at_eos=True, cache=False)[0]  # past_key_values
    stream = token_stream(np.asarray(prompt, dtype=np.int32), lm.eos_id)[None]
    processor = KNNLogitsProcessor(lm)
    out = lm.model.hf.generate(input_ids=stream, attention_mask=torch.ones_like(stream), do_sample=False,
                               max_new_tokens=12, logits_processor=[processor], pad_token_id=lm.eos_id)
    assert out[0, stream.shape[1]:].tolist() == ours
    # the processor's first distribution is knnlm's next-token distribution
    scores = lm.model.hf(stream).logits[:, -1]
    np.testing.assert_allclose(processor(stream, scores)[0].numpy(), lm.next_token_logprobs(np.asarray(prompt)).numpy(),
                               atol=1e-4)


def test_past_key_values_decoding_equals_recomputing_the_prefix(tmp_path):
    """HFCausalLM(new, cache) after a prefix = one pass over the whole text (hidden states and keys)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from knnlm.config import ModelConfig
    from knnlm.hf import HFCausalLM
    from knnlm.lm import DecodeCache

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=60, n_positions=32, n_embd=32, n_layer=2, n_head=2, bos_token_id=0,
                               eos_token_id=0)).save_pretrained(tmp_path)
    model = HFCausalLM(ModelConfig(hf_path=str(tmp_path), context=32)).eval()
    x = torch.randint(0, 60, (2, 12))
    with torch.no_grad():
        full, cache = model(x), DecodeCache()
        parts = [model(x[:, :5], cache)] + [model(x[:, i : i + 1], cache) for i in range(5, 12)]
    assert cache.length == 12
    assert torch.allclose(torch.cat([p.hidden for p in parts], 1), full.hidden, atol=1e-5)
    assert torch.allclose(torch.cat([p.key for p in parts], 1), full.key, atol=1e-5)
