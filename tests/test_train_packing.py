"""`neat_packing` keeps each sample's M-RoPE positions (overlay `qwen_merge/mrope_packing.py`): through LLaMA-Factory's
own dataset pipeline and collator, every sample of a packed row gets exactly the 3-D positions it gets unpacked, and
the packed batch gives the loss of the unpacked batch."""
from __future__ import annotations

import pytest
import torch

from examples.tiny.make_tiny_data import make_tiny_data

pytestmark = pytest.mark.timeout(600)

# Multi-turn chat, captions and reasoning samples, each with a photo: 6 samples of different lengths.
DATASETS = "ai2d_gpt4v,LLaVA_ReCap_558K,text2image"


@pytest.fixture(scope="module")
def batches(tmp_path_factory, tiny_merged, sample_images):
    """(model, packed batch, unpacked batch), both built by LLaMA-Factory's get_dataset + SFT collator."""
    from llamafactory.data import SFTDataCollatorWith4DAttentionMask, get_dataset, get_template_and_fix_tokenizer
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_model, load_tokenizer

    work = tmp_path_factory.mktemp("packing")
    data = make_tiny_data(work / "data", images=sample_images[0].parent)
    model = None
    built = {}
    for packed in (True, False):
        model_args, data_args, training_args, finetuning_args, _ = get_train_args(dict(
            model_name_or_path=str(tiny_merged), stage="sft", do_train=True, finetuning_type="full",
            dataset=DATASETS, dataset_dir=str(data), template="qwen_merge_vl", cutoff_len=1024, max_samples=2,
            image_max_pixels=12544, neat_packing=packed, output_dir=str(work / "out"), overwrite_cache=True,
            cache_dir=str(work / "cache"), report_to="none", bf16=False))
        modules = load_tokenizer(model_args)
        template = get_template_and_fix_tokenizer(modules["tokenizer"], data_args)
        dataset = get_dataset(template, model_args, data_args, training_args, stage="sft", **modules)["train_dataset"]
        if model is None:
            model = load_model(modules["tokenizer"], model_args, finetuning_args, is_trainable=False)
        collator = SFTDataCollatorWith4DAttentionMask(
            template=template, model=model, pad_to_multiple_of=8, label_pad_token_id=-100,
            block_diag_attn=model_args.block_diag_attn, attn_implementation=model.config._attn_implementation,
            compute_dtype=torch.float32, **modules)
        # The collator turns neat-packing segment ids into a 4-D mask; keep them to find the samples.
        features = [dataset[i] for i in range(len(dataset))]
        segment_ids = [f["attention_mask"] for f in features]
        built[packed] = (collator(features), segment_ids)
    return model, built[True], built[False]


def test_rows_are_really_packed(batches):
    _, (packed, segment_ids), (unpacked, _) = batches
    assert packed["input_ids"].shape[0] == 1 and unpacked["input_ids"].shape[0] == 6
    assert sorted(set(segment_ids[0]) - {0}) == list(range(1, 7))
    assert packed["attention_mask"].dim() == 4  # block-diagonal attention


def test_each_packed_sample_keeps_its_unpacked_positions(batches):
    _, (packed, segment_ids), (unpacked, _) = batches
    segments = torch.tensor(segment_ids[0])
    unpacked_rows = {}
    for row in range(unpacked["input_ids"].shape[0]):
        real = unpacked["attention_mask"][row].bool()
        unpacked_rows[tuple(unpacked["input_ids"][row][real].tolist())] = unpacked["position_ids"][:, row][:, real]
    for segment in range(1, int(segments.max()) + 1):
        in_segment = segments == segment
        tokens = tuple(packed["input_ids"][0, : len(segments)][in_segment].tolist())
        positions = packed["position_ids"][:, 0, : len(segments)][:, in_segment]
        assert positions[:, 0].tolist() == [0, 0, 0]
        assert torch.equal(positions, unpacked_rows[tokens])


def test_packed_and_unpacked_batches_give_the_same_loss(batches):
    model, (packed, _), (unpacked, _) = batches
    with torch.no_grad():
        packed_loss, unpacked_loss = model(**packed).loss, model(**unpacked).loss
    assert torch.isfinite(packed_loss)
    torch.testing.assert_close(packed_loss, unpacked_loss, rtol=1e-5, atol=0)


def test_neat_packing_runs_the_text_attention_per_document(batches):
    """load_model with neat_packing switches the text decoder (not the vision tower) to `qwen_merge_packed`."""
    model, _, _ = batches
    assert model.model.language_model.config._attn_implementation == "qwen_merge_packed"
    assert model.model.visual.config._attn_implementation == "sdpa"


def test_documents_are_read_off_llamafactorys_block_mask():
    from llamafactory.data.collator import prepare_4d_attention_mask
    from transformers.models.qwen2_5_vl_merge.packed_attention import documents_of

    segments = torch.tensor([[1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 0, 0]])
    docs = documents_of(prepare_4d_attention_mask(segments, torch.bfloat16))
    assert docs.spans == (((0, 2, False), (2, 5, False), (5, 6, True)), ((0, 4, False), (4, 6, True)))
    assert docs.cu_seqlens.tolist() == [0, 2, 5, 6, 10, 12] and docs.longest == 4
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    assert documents_of(causal[None, None]).spans == (((0, 6, False),),)
    leaky = causal.clone()
    leaky[3, 1] = False  # not exactly block-diagonal causal: left to SDPA with the mask
    assert documents_of(leaky[None, None]) is None


def test_per_document_attention_equals_sdpa_with_the_block_mask(batches):
    """Loss and every gradient of a packed batch: per-document attention against SDPA over the whole row with
    LLaMA-Factory's block-diagonal mask (the same model and batch)."""
    model, (packed, _), _ = batches
    text_config = model.model.language_model.config
    model.requires_grad_(True)  # loaded for inference by the fixture
    results = {}
    for impl in ("qwen_merge_packed", "sdpa"):
        text_config._attn_implementation = impl
        model.zero_grad(set_to_none=True)
        loss = model(**packed).loss
        loss.backward()
        results[impl] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    text_config._attn_implementation = "qwen_merge_packed"
    model.zero_grad(set_to_none=True)
    model.requires_grad_(False)
    (loss_docs, grads_docs), (loss_sdpa, grads_sdpa) = results["qwen_merge_packed"], results["sdpa"]
    torch.testing.assert_close(loss_docs, loss_sdpa, rtol=1e-5, atol=0)
    assert grads_docs.keys() == grads_sdpa.keys() and len(grads_docs) > 10
    for name, grad in grads_docs.items():
        reference = grads_sdpa[name]  # fp32; sums taken in another order: compare at the tensor's scale
        assert float((grad - reference).abs().max()) <= 1e-5 * float(reference.abs().max()) + 1e-9, name
