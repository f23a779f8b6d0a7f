"""dfqvit.evaluate.evaluate: the same top-1 from every data form it takes; labels that are not one class index per
image are named (they broadcast against the predictions and gave 100% or 0%)."""
import pytest
import torch

from dfqvit.errors import DFQViTError
from dfqvit.evaluate import evaluate


@pytest.fixture(scope="module")
def model_and_data():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 10))
    x, y = torch.randn(10, 3, 2, 2), torch.randint(0, 10, (10,))
    with torch.no_grad():
        expected = 100.0 * float((model(x).argmax(-1) == y).float().mean())
    return model, x, y, expected


def test_every_data_form_gives_the_same_top1(model_and_data):
    model, x, y, expected = model_and_data
    dataset = torch.utils.data.TensorDataset(x, y)
    class Stream(torch.utils.data.IterableDataset):  # no len(): "object of type 'Stream' has no len()"
        def __iter__(self):
            return iter(zip(x, y))

    for data in (dataset, torch.utils.data.DataLoader(dataset, batch_size=3), (x, y), (x.numpy(), y.numpy()),
                 torch.utils.data.TensorDataset(x, y[:, None]),  # (N, 1) labels: one index per image too
                 # a list of images / of labels: torch.stack's and TensorDataset's raw errors
                 Stream(), (list(x), y), (x, y.tolist()), (list(x), y.tolist()),
                 (x, list(y)), (x, [v.numpy() for v in y])):  # 0-d tensors / arrays: [y for _, y in dataset]
        result = evaluate(model, data, 4, progress=False)
        assert (result.top1, result.images) == (pytest.approx(expected), 10)
    assert 0 < expected < 100


@pytest.mark.parametrize("labels, message", [
    (lambda y: torch.nn.functional.one_hot(y, 10), r"labels of shape \(4, 10\).*labels.argmax\(-1\)"),
    (lambda y: y.float(), "dtype torch.float32"),
    (lambda y: y > 4, "dtype torch.bool"),
    # outside the model's 10 classes: top-1 came out 0% without a word
    (lambda y: y + 100, "labels run from 10[0-9] to 10[0-9] but the model has 10 classes"),
    (lambda y: y - 100, "labels run from -"),
    # as a list in an (images, labels) pair: the collate's raw "expected Tensor as element 1"
    (lambda y: y.float().tolist(), "dtype torch.float"),
    (lambda y: [str(v) for v in y.tolist()], "are not class indices"),
    (lambda y: torch.nn.functional.one_hot(y, 10).tolist(), r"labels of shape \(4, 10\)"),  # one-hot rows as lists
])
def test_labels_that_are_not_class_indices_are_named(model_and_data, labels, message):
    model, x, y, _ = model_and_data
    labels = labels(y)
    with pytest.raises(DFQViTError, match=message):
        evaluate(model, (x, labels) if isinstance(labels, list) else torch.utils.data.TensorDataset(x, labels), 4,
                 progress=False)


@pytest.mark.parametrize("data, batch_size, message", [
    (None, 4, "evaluation data of type NoneType"), ("ok", True, "batch size True"),
    ([], 4, "holds no images"),
    ("triple", 4, "evaluation data of 3 tensors"),  # was torch.stack's raw error
    ("short_labels", 4, r"\(10, 3, 2, 2\) images and \(9,\) labels"),  # was TensorDataset's AssertionError
    ("mixed_sizes", 4, r"images of different sizes"),  # was torch.stack's raw error
])
def test_bad_data_and_batch_sizes_are_named(model_and_data, data, batch_size, message):
    model, x, y, _ = model_and_data
    data = {"ok": torch.utils.data.TensorDataset(x, y), "triple": (x, y, y), "short_labels": (x, y[:9]),
            "mixed_sizes": ([x[0], x[1, :, :1]], [0, 1])}.get(data, data) \
        if isinstance(data, str) else data
    with pytest.raises(DFQViTError, match=message):
        evaluate(model, data, batch_size, progress=False)


def test_reference_of_another_width_and_a_missing_gpu_are_named(model_and_data):
    model, x, y, _ = model_and_data
    other = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 100))
    with pytest.raises(DFQViTError, match="reference model has 100 classes and the model 10"):  # agreement 0%
        evaluate(model, (x, y), 4, reference=other, progress=False)
    if not torch.cuda.is_available():
        with pytest.raises(DFQViTError, match="no CUDA device"):  # was "Found no NVIDIA driver"
            evaluate(model, (x, y), 4, device="cuda", progress=False)


def test_a_model_in_training_mode_is_scored_in_eval_mode_and_given_back():
    """Dropout ran: three calls on the same data gave three top-1 figures. The caller's RNG moved as well."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Dropout(0.5), torch.nn.Linear(12, 10)).train()
    x, y = torch.randn(64, 3, 2, 2), torch.randint(0, 10, (64,))
    state = torch.random.get_rng_state()
    results = {evaluate(model, (x, y), 16, reference=model, progress=False) for _ in range(3)}
    assert len(results) == 1 and results.pop().agreement == 100.0
    assert model.training and torch.equal(torch.random.get_rng_state(), state)


def test_a_stream_does_not_move_the_callers_random_state(model_and_data):
    """An IterableDataset's loader drew its base seed from the global RNG (the map-style one already had its own)."""
    model, x, y, _ = model_and_data

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(zip(x, y))

    torch.manual_seed(7)
    evaluate(model, Stream(), 4, progress=False)
    after = torch.rand(1)
    torch.manual_seed(7)
    assert torch.equal(after, torch.rand(1))
