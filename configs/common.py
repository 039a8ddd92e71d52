"""The full set of hyperparameters every stage reads; dataset configs start from `base_config()`.

Every key any stage of ltdd_jax reads is listed here, so a typo in `--config.x=...` fails at parse
time (the ConfigDict is locked) and the resolved config written to the workdir is the whole story.
"""

from __future__ import annotations

import ml_collections


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses the `:key=value,...` suffix of `--config=configs/x.py:...` into a ConfigDict.

  Unknown keys fail with the list of accepted ones; values take the type of their default.
  """
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    if key not in defaults:
      raise ValueError(f"Unknown config argument {key!r} in {arg!r}; accepted: {sorted(defaults)}.")
    kind = type(defaults[key])
    out[key] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
  return out


def base_config() -> ml_collections.ConfigDict:
  """Every hyperparameter with a neutral value; dataset configs set them per profile."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.profile = "cpu"
  # mtt | datm | ltdd, or a baseline: random | herding | full, with optional plugins
  # (+two_stage, +hierarchical, +rectify): ltdd_jax/methods/registry.py.
  c.method = "mtt"
  # Stages (experts, distill, or all) whose outputs in the workdir are discarded and redone when
  # they were made with other config values; by default such a resume fails and names the keys.
  c.discard_mismatched = ""

  c.data = ml_collections.ConfigDict()
  c.data.dataset = "digits"           # Name used in reports.
  c.data.train_source = "digits"      # digits | tfds | folder | listfile
  c.data.test_source = "digits"       # digits | tfds | folder | listfile | holdout:K
  c.data.tfds_name = "cifar10"
  c.data.train_path = ""              # folder, .tar.gz or list file for folder/listfile sources.
  c.data.test_path = ""
  c.data.image_root = ""              # listfile: folder the listed paths are relative to.
  c.data.image_size = 32              # folder/listfile images of another size are resized to it
  c.data.resize = "squash"            # ... squash (both sides) | center_crop (shorter side, centre)
  c.data.cache_dir = "~/.cache/ltdd_jax"
  c.data.imbalance_factor = 10.0
  c.data.imbalance_profile = "exp"    # exp | step
  c.data.n_max = 0                    # 0: all the smallest class pool allows.
  c.data.validation_per_class = 0
  # pool: validation set aside before the LT draw; leftover: from what the LT subset leaves over.
  c.data.validation_from = "pool"
  c.data.normalize = True             # per-channel mean/std
  c.data.zca = False
  c.data.zca_eps = 0.1
  c.data.shot_rule = "thirds"         # thirds (CIFAR) | thresholds (ImageNet-LT)

  # Differentiable siamese augmentation: how it augments. Whether each stage uses it is that
  # stage's switch: experts.dsa, distill.dsa (the student's inner steps), evaluate.dsa.
  c.dsa = ml_collections.ConfigDict()
  c.dsa.strategy = "color_crop_cutout_flip_scale_rotate"
  c.dsa.mode = "single"               # single (DSA's 'S': one family per call) | all
  c.dsa.siamese = True
  c.dsa.brightness = 1.0
  c.dsa.saturation = 2.0
  c.dsa.contrast = 0.5
  c.dsa.crop_pad = 0.125
  c.dsa.cutout = 0.5
  c.dsa.scale = 1.2
  c.dsa.rotate = 15.0

  c.model = ml_collections.ConfigDict()
  c.model.name = "convnet"            # convnet | resnet18 | vgg11 | alexnet
  c.model.depth = 3
  c.model.width = 128
  c.model.norm = "instance"           # instance | batch | none
  # torch: PyTorch's default initialisation (what the published networks use); flax: Flax's.
  c.model.init = "torch"
  c.model.conv_impl = "auto"          # auto | xla | im2col
  c.model.ensemble_impl = "auto"      # auto | vmap | map: how K/T networks run in one program

  c.mesh = ml_collections.ConfigDict()
  c.mesh.num_devices = -1
  c.mesh.distributed = False          # call jax.distributed.initialize() (multi-host)
  # JAX persistent compilation cache ('' = off): repeated programs load instead of compiling.
  c.mesh.compilation_cache_dir = "~/.cache/ltdd_jax/xla"

  c.experts = ml_collections.ConfigDict()
  c.experts.directory = ""            # shared expert folder (reused across runs); "": <workdir>/experts
  c.experts.num_experts = 5
  c.experts.epochs = 10
  c.experts.lr = 0.01
  c.experts.momentum = 0.0
  c.experts.weight_decay = 0.0
  c.experts.batch_size = 256
  c.experts.sampling = "instance"     # instance | class_balanced
  c.experts.loss = "ce"               # ce | balanced_softmax
  c.experts.dsa = True
  # Classifier-only re-training (LTDD's classifier experts), run after the main trajectories.
  c.experts.classifier_epochs = 10    # classifier-only re-training epochs (LTDD ED only)
  c.experts.classifier_from_epoch = -1  # -1: the last epoch
  c.experts.classifier_lr = 0.01
  c.experts.classifier_sampling = "class_balanced"
  # Length of a class-balanced epoch: max_class = largest class x C draws (LTDD's class-aware
  # sampler), dataset = N draws.
  c.experts.balanced_epoch = "max_class"

  c.distill = ml_collections.ConfigDict()
  c.distill.ipc = 10
  c.distill.syn_steps = 10
  c.distill.expert_epochs = 2
  c.distill.max_start_epoch = 5
  c.distill.iterations = 200
  c.distill.lr_img = 100.0
  c.distill.lr_lr = 1e-5
  c.distill.syn_lr_init = 0.01
  # Several objectives (hierarchical: stage 1 and each group's stage 2): each learns its own lr, and
  # each network of the two-stage classifier trains with its objective's lr.
  c.distill.lr_per_objective = True
  c.distill.momentum = 0.5
  c.distill.batch_syn = 100
  c.distill.dsa = True                # DSA on every inner step of the student (MTT, DATM, LTDD)
  c.distill.init = "real"             # real | noise
  c.distill.allow_duplicates = True   # classes with fewer than ipc images repeat them
  c.distill.remat = True              # jax.checkpoint the inner step (memory ~ constant in syn_steps)
  c.distill.remat_policy = "nothing_saveable"
  c.distill.checkpoint_every = 50
  c.distill.eval_every = 0            # 0: validation only at the end
  c.distill.log_every = 10

  # DATM-style options (method=datm and ltdd).
  c.datm = ml_collections.ConfigDict()
  c.datm.lr_label = 2.0
  c.datm.label_momentum = 0.9         # momentum of the soft labels' SGD (DATM's Momentum_y)
  c.datm.label_expert_epoch = -1      # expert epoch whose logits initialise soft labels; -1: last
  c.datm.correct_only = True          # initialise from images the experts classify correctly
  c.datm.init_experts = -1            # experts searched for them, in order (-1: all, as DATM)
  c.datm.duplicate = False            # a class short of ipc such images fills with its others
  c.datm.min_start_epoch = 0
  c.datm.initial_max_start_epoch = 2  # window upper bound grows from here to distill.max_start_epoch
  c.datm.window_grow_every = 50       # iterations per +1 of the window's upper bound

  # LTDD-style options (method=ltdd).
  c.ltdd = ml_collections.ConfigDict()
  c.ltdd.dam = True                   # inner loss weighted by LT class frequency n_c / N
  c.ltdd.dam_reduction = "batch"      # batch: weighted sum / batch size (LTDD) | weighted_mean
  c.ltdd.ed = True                    # backbone / classifier decoupled matching
  c.ltdd.backbone_weight = 0.5        # ED's backbone term (LTDD's first_stage_lambda)
  c.ltdd.classifier_weight = 1.0      # ED's classifier term (second_stage_lambda)
  c.ltdd.classifier_max_start_epoch = 1  # classifier-stage start epochs in [0, this)
  c.ltdd.classifier_dam = False       # DAM weights in the classifier term too (LTDD: off)
  c.ltdd.classifier_freeze_backbone = True  # the student trains its head alone there (LTDD)
  c.ltdd.grow_window = False          # DATM's growing start window (LTDD IF 100: off)
  c.ltdd.init_experts = 1             # soft-label init: LTDD searches its first expert only ...
  c.ltdd.duplicate = True             # ... and repeats the correctly classified images it found

  c.evaluate = ml_collections.ConfigDict()
  c.evaluate.num_models = 3
  c.evaluate.epochs = 300
  c.evaluate.full_epochs = 30         # epochs for the `full` baseline (standard training)
  c.evaluate.full_lr = 0.01           # lr of the `full` baseline
  c.evaluate.lr = 0.01                # baselines; distilled sets use their learned lr
  c.evaluate.use_learned_lr = True
  c.evaluate.momentum = 0.9
  c.evaluate.weight_decay = 5e-4
  c.evaluate.batch_size = 256
  c.evaluate.dsa = True
  c.evaluate.archs = ("convnet",)
  c.evaluate.cross_arch_width = 64    # base width of resnet18 / vgg11 / alexnet
  c.evaluate.test_batch_size = 1000
  c.evaluate.checkpoint_seconds = 300.0  # least time between saves of an evaluation (resume)
  # fixed: networks fit each image's stored (soft) label; relabel: they fit a teacher's softmax on
  # every augmented batch (the statistics-matching observers' teacher, trained on the LT set).
  c.evaluate.protocol = "fixed"          # fixed | relabel
  c.evaluate.relabel_temperature = 1.0   # the teacher's softmax temperature (relabel_recipe=protocol)
  # How relabelled networks train: `rded` is the student recipe of RDED (which SRe2L, EDC and the
  # statistics-matching family evaluate with), its ConvNet-3 CIFAR-10 values below; `protocol`
  # keeps the SGD recipe above, so that only the targets change.
  c.evaluate.relabel_recipe = "rded"      # rded | protocol
  c.evaluate.rded = ml_collections.ConfigDict()
  c.evaluate.rded.optimizer = "adamw"     # adamw | sgd
  c.evaluate.rded.lr = 0.001
  c.evaluate.rded.weight_decay = 0.01     # AdamW's, on kernels alone
  c.evaluate.rded.schedule = "half_cosine"  # lr (1 + cos(pi e / 2E)) / 2 | step
  c.evaluate.rded.batch_size = 0          # 0: by IPC, 10 / 50 / 100 at IPC 1 / <50 / >=50 (x2 at 100 classes)
  c.evaluate.rded.mix = "cutmix"          # cutmix | none; the teacher labels the mixed batch
  c.evaluate.rded.mix_beta = 1.0
  c.evaluate.rded.augment = "flip"        # flip | dsa | none, before mixing
  c.evaluate.rded.temperature = 20.0      # teacher and student logits / T (RDED with CutMix)

  c.grouping = ml_collections.ConfigDict()
  c.grouping.strategy = "frequency"   # frequency | similarity | manual
  c.grouping.max_imbalance = 5.0
  c.grouping.num_groups = 0           # >0 overrides max_imbalance for frequency/similarity
  c.grouping.manual = ()              # ((0, 1), (2, 3, 4), ...) for strategy=manual
  c.grouping.min_group_size = 2
  c.grouping.prediction = "soft"      # soft | hard
  c.grouping.lambda_1 = 1.0
  c.grouping.lambda_2 = 1.0
  # Stage 1 on real images (group experts; the two-stage classifier's group network on a real
  # set) against the between-group imbalance: class_balanced draws every group equally often.
  # by_class draws every class equally often, so a group in proportion to its classes.
  c.grouping.stage1_sampling = "class_balanced"  # instance | class_balanced | by_class
  c.grouping.stage1_loss = "ce"                   # ce | balanced_softmax
  # Stage 2: each group's student unrolls syn_steps x (its experts' SGD steps per epoch / the flat
  # experts'), at least 1, so every objective's unroll spans a comparable number of expert steps.
  c.grouping.step_matched_unroll = True
  # LTDD's expert decoupling (ED) per hierarchical objective: only where the objective's experts
  # drew their classes at least this imbalanced (largest / smallest, as sampled). ED re-learns a
  # classifier the imbalance biased; group-balanced stage-1 experts and groups of at most
  # `max_imbalance` have little bias, their classifier experts barely move, and the classifier
  # term's normalised distance then collapses the objective's lr (docs/protocol.md). 10 is the
  # smallest imbalance factor LTDD's published configs apply ED at. Flat LTDD always uses ED.
  c.grouping.ed_min_imbalance = 10.0

  # The two-stage classifier (+two_stage, +hierarchical; ltdd_jax/methods/two_stage.py): separate
  # networks per stage, or one shared backbone with a group head and a head per group.
  c.two_stage = ml_collections.ConfigDict()
  c.two_stage.arch = "shared"         # shared | separate
  # A two-stage run's test evaluation also trains the other classifiers on the same set (one flat
  # network, the other architecture) and records them under report.json's `classifiers`.
  c.two_stage.compare = True

  # Statistics matching (method=unilevel, ltdd_jax/run/synthesize.py; Cui et al., AAAI 2026;
  # docs/protocol.md names the source of every value): an observer and a teacher (batch-norm
  # ConvNets of the run's depth and width) trained with the robust and debias terms, their
  # batch-norm statistics recalibrated per class, images recovered from teacher-scored real crops.
  c.unilevel = ml_collections.ConfigDict()
  c.unilevel.observer_epochs = 200
  c.unilevel.observer_lr = 0.01
  c.unilevel.observer_momentum = 0.9
  c.unilevel.observer_weight_decay = 5e-3
  c.unilevel.observer_batch_size = 64
  c.unilevel.observer_schedule = "warmup_cosine"  # warmup_cosine (GLMC, per epoch) | constant
  c.unilevel.observer_warmup = 0.05           # share of the epochs warming up (GLMC: 10 of 200)
  c.unilevel.observer_dsa = True
  c.unilevel.observer_projection_dim = 128
  c.unilevel.observer_q = 0.8                 # debias weights ~ n_k^-q
  c.unilevel.observer_normalise = "mean"      # mean | sum: the weights average 1 | sum to 1
  c.unilevel.observer_robust_weight = 1.0     # gamma_1 (consistency)
  c.unilevel.observer_debias_weight = 1.0     # gamma_2
  c.unilevel.recalibration_batch = 256
  c.unilevel.iterations = 1000
  c.unilevel.lr = 0.05                        # Adam on the pixels
  c.unilevel.beta1 = 0.5
  c.unilevel.beta2 = 0.9
  c.unilevel.ce_weight = 1.0                  # the teacher's cross-entropy on the images
  c.unilevel.statistics_weight = 0.01         # the batch-norm statistics distance
  c.unilevel.class_weight = 1.0               # its class-wise term beside the global one
  c.unilevel.first_multiplier = 10.0          # the first batch-norm layer counts this many times
  c.unilevel.crops = 5                        # crops per real image scored for the start
  c.unilevel.min_scale = 0.5                  # random resized crops keep at least this area

  # +rectify (ADSA-style soft-label rectification, ltdd_jax/methods/rectify.py): labels become
  # softmax(logits - tau log pi) with pi the training class frequencies.
  c.rectify = ml_collections.ConfigDict()
  c.rectify.mode = "adsa"             # adsa | validation | fixed
  c.rectify.tau = 1.0                 # mode=fixed
  c.rectify.tau_min = 0.0             # mode=adsa searches tau_min..tau_max by tau_step
  c.rectify.tau_max = 3.0
  c.rectify.tau_step = 0.01
  c.rectify.validation_taus = (0.0, 0.5, 1.0, 1.5, 2.0)  # mode=validation
  c.rectify.at = "final"              # final (ADSA) | init | both
  c.rectify.keep_class = False        # cap an image's tau where its own class would lose the argmax
  return c
