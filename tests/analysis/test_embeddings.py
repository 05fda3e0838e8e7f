from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from transformers import BertForMaskedLM, BertForSequenceClassification

from rosmap_geneformer.analysis import embeddings
from rosmap_geneformer.geneformer.model import geneformer_bert_config

VOCAB = 60


def tiny_config(n_layers: int = 3):
    return geneformer_bert_config(
        vocab_size=VOCAB,
        max_position_embeddings=64,
        num_hidden_layers=n_layers,
        hidden_size=32,
        num_attention_heads=4,
        intermediate_size=64,
        dropout=0.02,
        attention_dropout=0.0,
    )


@pytest.fixture(scope="module")
def saved_models(
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, tuple[Path, torch.nn.Module]]:
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    out = {}
    for name, cls in (("mlm", BertForMaskedLM), ("classifier", BertForSequenceClassification)):
        model = cls(tiny_config()).eval()
        model.save_pretrained(root / name)
        out[name] = (root / name, model)
    return out


def random_cells(n: int, *, seed: int, special: bool) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    cells = []
    for _ in range(n):
        genes = rng.choice(np.arange(4, VOCAB), size=int(rng.integers(5, 40)), replace=False)
        ids = genes.tolist()
        cells.append([2, *ids, 3] if special else ids)
    return cells


def reference_embedding(
    model: torch.nn.Module, ids: list[int], layer: int, special: bool, emb_mode: str = "auto"
):
    """Full model, one cell at a time, hidden_states[layer]: the <cls> vector of a V2 cell
    (Geneformer's default), else the mean over the gene positions."""
    with torch.no_grad():
        states = model.bert(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
    h = states[layer][0]
    if special and emb_mode != "cell":
        return h[0].numpy()
    return (h[1:-1] if special else h).mean(0).numpy()


def test_hidden_layer_index_follows_geneformer():
    assert embeddings.hidden_layer_index(6, -1) == 5
    assert embeddings.hidden_layer_index(6, 0) == 6
    assert embeddings.hidden_layer_index(6, -6) == 0
    with pytest.raises(ValueError, match="out of range"):
        embeddings.hidden_layer_index(6, 1)
    with pytest.raises(ValueError, match="out of range"):
        embeddings.hidden_layer_index(6, -7)


@pytest.mark.parametrize("kind", ["mlm", "classifier"])
def test_load_encoder_returns_the_bert_encoder(saved_models, kind):
    path, model = saved_models[kind]
    encoder, config = embeddings.load_encoder(path, device="cpu")
    assert not encoder.training
    assert config.num_hidden_layers == 3
    assert encoder.config.output_hidden_states
    theirs = model.bert.state_dict()
    for key, value in encoder.state_dict().items():
        assert torch.equal(value, theirs[key]), key


def test_load_encoder_errors_name_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        embeddings.load_encoder(tmp_path)


@pytest.mark.parametrize("emb_layer", [0, -1, -3])
def test_truncated_encoder_matches_hidden_states(saved_models, emb_layer):
    path, model = saved_models["mlm"]
    encoder, _ = embeddings.load_encoder(path, device="cpu")
    index = embeddings.hidden_layer_index(3, emb_layer)
    ids = torch.tensor(random_cells(3, seed=1, special=False)[0])[None]
    states = embeddings.hidden_states(encoder, ids, layer_index=index)
    with torch.no_grad():
        expected = model.bert(input_ids=ids, output_hidden_states=True).hidden_states[index]
    torch.testing.assert_close(states, expected, atol=1e-5, rtol=1e-5)
    assert len(encoder.encoder.layer) == 3  # the view leaves the encoder whole


@pytest.mark.parametrize(("special", "emb_mode"), [(False, "auto"), (True, "auto"), (True, "cell")])
def test_cell_embeddings_match_one_cell_at_a_time(saved_models, special, emb_mode):
    path, model = saved_models["classifier"]
    cells = random_cells(11, seed=2, special=special)
    dataset = datasets.Dataset.from_dict({"input_ids": cells, "length": [len(c) for c in cells]})
    token_dictionary = {"<pad>": 0, "<mask>": 1}
    if special:
        token_dictionary.update({"<cls>": 2, "<eos>": 3})
    got = embeddings.cell_embeddings(
        path,
        dataset,
        emb_layer=-1,
        batch_size=4,
        token_dictionary=token_dictionary,
        emb_mode=emb_mode,
    )
    assert got.dtype == np.float32
    assert got.shape == (11, 32)
    for i, ids in enumerate(cells):  # rows stay in dataset order despite length sorting
        expected = reference_embedding(model, ids, 2, special, emb_mode)
        np.testing.assert_allclose(got[i], expected, atol=2e-5)


def test_special_tokens_detected_from_data_or_dictionary():
    v2 = datasets.Dataset.from_dict({"input_ids": random_cells(5, seed=3, special=True)})
    v1 = datasets.Dataset.from_dict({"input_ids": random_cells(5, seed=3, special=False)})
    assert embeddings.detect_special_tokens(v2)
    assert not embeddings.detect_special_tokens(v1)
    assert embeddings.detect_special_tokens(v1, token_dictionary={"<cls>": 2, "<eos>": 3})


def test_embed_batch_gene_embeddings_cut_padding(saved_models):
    encoder, _ = embeddings.load_encoder(saved_models["mlm"][0], device="cpu")
    cells = random_cells(4, seed=4, special=False)
    cell_emb, genes = embeddings.embed_batch(encoder, cells, layer_index=2)
    assert [g.shape[0] for g in genes] == [len(c) for c in cells]
    for i in range(4):
        np.testing.assert_allclose(cell_emb[i], genes[i].mean(0), atol=1e-5)
