"""Every extension point of rwft, in one place.

Each hook hands the plugin a ``register`` callback owned by the core (the ``llm``
pattern): the plugin calls it once per feature it provides, the core records which
plugin registered what, refuses duplicate names and answers lookups with close
matches. Built-in features in ``rwft.plugins`` use these hooks exactly like a
third-party package that declares an entry point in the ``rwft`` group::

    [project.entry-points.rwft]
    my_backbones = "my_package.rwft_plugin"

The contract of each ``factory`` is stated on its hook below. A plugin may
implement any subset of the hooks.
"""

from __future__ import annotations

from typing import Protocol

import pluggy

PROJECT_NAME = "rwft"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


class Register(Protocol):
    """The callback every ``register_*`` hook receives."""

    def __call__(self, name: str, factory: object, description: str = "") -> None: ...


@hookspec
def register_backbones(register: Register) -> None:
    """Register image backbones: ``register(name, factory, description)``.

    ``name`` is what users write in ``model.backbone``. A name ending in ``/`` (for
    example ``"timm/"``) registers a *family*: ``model.backbone=timm/resnet18`` then
    calls that family's factory with ``arch="resnet18"``.

    Contract of ``factory(*, arch, pretrained, weights) -> rwft.core.model.Backbone``:

    - ``arch``: the part after the family prefix, or ``None`` for a plain name.
    - ``pretrained``: ``True`` loads pretrained (ImageNet) weights, ``False`` gives
      the same architecture with random initialisation ("scratch").
    - ``weights``: a local file to load the pretrained weights from instead of the
      hub (``model.weights``); ``None`` means the backbone's default source. Loading
      from the hub and from a file must go through the same code.
    - Returns a ``Backbone`` whose ``module`` maps a normalised ``(N, 3, H, W)``
      float tensor to ``(N, num_features)`` pooled features (no classifier), and which
      states the input normalisation (``mean``/``std``) its weights expect and the
      attribute path of its first convolution (used by the ``weightsum`` adapter;
      ``None`` when there is no single first convolution, which rules ``weightsum`` out).
    - Optionally ``saliency_layer``: the attribute path (inside ``module``) of the feature
      map Grad-CAM explains in ``rwft predict --saliency``; ``None`` lets rwft pick the
      last module with a spatial (N, C, H, W) output.
    - Must not download anything when ``pretrained`` is ``False``.
    """


@hookspec
def register_adapters(register: Register) -> None:
    """Register channel adapters (grayscale X-ray -> the backbone's 3 input channels).

    Contract of ``factory(backbone: Backbone) -> torch.nn.Module``:

    - The returned module maps ``(N, 1, H, W)`` grayscale images with values in
      ``[0, 1]`` to ``(N, backbone.in_chans, H, W)``; rwft applies the backbone's
      normalisation after the adapter. It runs in front of the backbone and its parameters
      train with the model (in ``probe`` mode too: it is part of the input pipeline).
    - The factory may modify ``backbone.module`` in place (``weightsum`` folds the
      first convolution's RGB kernels into one input channel and returns an identity)
      and must then update ``backbone.in_chans``.
    - At initialisation an adapter should reproduce ``replicate`` (the grayscale
      image copied to three channels), so that pretrained features are preserved.
    """


@hookspec
def register_strategies(register: Register) -> None:
    """Register federated aggregation strategies (``federation.strategy``).

    Contract of ``factory(config: RwftConfig, **common) -> flwr.serverapp.strategy.Strategy``:

    - ``config`` is the whole resolved run config (read ``config.federation``).
    - ``common`` holds the keyword arguments every Flower strategy accepts that the
      server computes for the run (``fraction_train``, ``fraction_evaluate``,
      ``min_train_nodes``, ``min_evaluate_nodes``, ``min_available_nodes``, and
      ``train_metrics_aggr_fn``, which averages only the sites' training numbers): pass them on.
    - Returns a Flower strategy from ``flwr.serverapp.strategy`` (or a subclass). The
      rwft server drives it round by round itself (``configure_train`` and
      ``aggregate_train`` every round, ``configure_evaluate`` once after the last), so
      that each round can be committed to disk and resumed. What it learns is saved with
      every round (``rwft.server.state.strategy_state``): its array-valued attributes
      (FedAdam's ``m_t``/``v_t``), the attributes it names in ``learned_attributes`` (a
      round counter, an adaptive clipping norm) and the state of a strategy it wraps
      (``.strategy``). Aggregation sees the model as flat float32 vectors (weights,
      BatchNorm statistics), so a strategy must work coordinate-wise or on whole vectors,
      as all of Flower's built-in ones do.
    - A strategy whose sites train differently (FedProx's proximal term, FedDyn's
      regulariser, SCAFFOLD-style control variates) registers
      ``rwft.core.site_algorithm.StrategyPlugin(server=factory, site=site_factory)``:
      ``site_factory(config) -> SiteAlgorithm`` is built by each site's ClientApp for every
      training message, adds loss terms to its local training and keeps tensors at the
      site from round to round (and across a resumed federation). It reads the numbers
      the strategy puts in the round's config record (``configure_train``). Messages
      carry nothing else: the weights, the round's config values and the site's scores
      (``rwft.federation.protocol``). A site that does not have the plugin trains plainly.
    """


@hookspec
def register_datasets(register: Register) -> None:
    """Register X-ray datasets (``data.dataset``).

    Contract of ``factory(data: DataConfig, *, seed: int) -> rwft.core.data.DatasetSplits``:

    - ``data.root`` is a path the user gave (already resolved against
      ``$RWFT_DATA_DIR``) or ``None``; with no usable data the factory raises
      ``rwft.core.errors.DataError`` saying exactly how to point rwft at the data.
    - Returns train/val/test splits of decoded ``uint8`` images, shape
      ``(N, data.image_size, data.image_size)``, with ``int64`` labels and the class
      names (label ``i`` is ``class_names[i]``). Decoding should happen once and be
      cached (``rwft.core.cache``), so that a federated round does not re-decode.
    - When the source has no usable validation split the factory carves one out of
      train (seeded, stratified, ``data.val_fraction``).
    - Bad files raise ``DataError`` naming each file and the fix, or, when
      ``data.on_bad_file == "skip"``, are left out and listed in ``DatasetSplits.skipped``.
    """


@hookspec
def register_commands(register: Register) -> None:
    """Register subcommands of the ``rwft`` command line (``rwft NAME ...``).

    Contract of ``factory(argv: list[str]) -> int``:

    - ``argv`` is everything after ``rwft NAME``; the command parses it itself (its own
      ``argparse`` parser, so ``rwft NAME --help`` works) and returns the process exit code.
    - A user's mistake raises ``rwft.core.errors.RwftError`` (printed as one line, exit 2),
      never a traceback.
    - ``description`` is the one line ``rwft --help`` shows.
    - The factory imports what it needs (Flower, Ray) when it runs, not at registration:
      registering commands must stay cheap and must not need those packages installed.
      This is how ``rwft.core`` offers ``rwft simulate`` without importing Flower itself.
    """
