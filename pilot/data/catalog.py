"""The datasets ``pilot data`` knows: where each original archive is, its published checksum (where one is
published), how pilot builds the benchmark split from it, and how a config then reads it.

A pinned ``sha256`` is a value published by someone else for the original archive (the ``checksum_source``
says where); an archive without one is trusted on first use: its hash is recorded at the first ``get``
(in the dataset's manifest and in ``<root>/.pilot-archives.json``) and a later ``get`` refuses another one.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from pilot.errors import PilotError

# The seed of every rule-made split (a class's files shuffled by it): PILOT's default seed.
SPLIT_SEED = 1993
TRAIN_FRACTION = 0.8


@dataclass(frozen=True)
class Archive:
    file: str  # its file name, as downloaded (and as ``--from DIR`` must hold it)
    url: str = ""  # a plain HTTP(S) download; empty where the host serves it only through a web page
    sha256: str = ""  # published value; empty: trusted on first use
    size: int = 0  # bytes, where published with the hash
    checksum_source: str = ""  # where the pinned value was published


@dataclass(frozen=True)
class DatasetEntry:
    name: str  # ``pilot data get NAME``
    title: str
    homepage: str
    archives: tuple[Archive, ...]
    folder: str  # the prepared dataset under --root
    layout: str  # how pilot builds it (pilot.data.fetch.BUILDERS)
    classes: int
    size: str  # the archives' size and image count, as their sources state them
    split: str  # the benchmark split pilot builds, in words (docs/datasets.md repeats it)
    licence: str
    use: str  # the config keys that read it, given --root as data_path
    no_download: str = ""  # why there is no direct download (then --from is the way)
    # Datasets whose PILOT archive (already split into train/ and test/) is also accepted: its web page.
    pilot_archive: str = ""
    domains: tuple[str, ...] = field(default=())


PILOT_README = "https://github.com/sun-hailong/LAMDA-PILOT#-datasets"
TFDS = "tensorflow/datasets"
RULE = (f"not in the release: per class, the files sorted by name are shuffled with numpy RandomState(s), "
        f"s = first 4 bytes of sha256('{SPLIT_SEED}/<class>'), and the first round({TRAIN_FRACTION} n) go to train/, "
        f"the rest to test/")
PILOT_SPLIT = "PILOT's archive as distributed (its own random subset and split; pilot takes train/ and test/ unchanged)"

DOMAINNET_DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")
_DOMAINNET_BASE = "http://csr.bu.edu/ftp/visda/2019/multi-source/"
# tensorflow_datasets' image_classification/domainnet/checksums.tsv: (zip path, zip size, zip sha256,
# train list size, train sha256, test list size, test sha256).
_DOMAINNET = {
    "clipart": ("groundtruth/clipart.zip", 1270909081, "f8f248a3e8bbc9868c523ae24e6601b4c2ad102afc60c0efeb4f3255df22354d",
                1443819, "affdadf5f95a7583e6b98030a3d35007e2613ee4dd942393c5a705ec2b429312",
                628917, "62c8e36aaba1c41ad9e249099739707220a44c08f167b37ef420f34a31628a6b"),
    "infograph": ("infograph.zip", 4338659804, "891e14f476317e97b6f06d6498c11d0a5b8d0c8b57210765ed9beb072da611fa",
                  1683098, "36b44cbd41a2915e0dc73b4f4be8862a6f3c220f93c8d63fb2439beeae3aefda",
                  728028, "413cfa54ac92e7e6b242f4f09fbd9c8ace85c4deaf3cb6c81ff6b68264460136"),
    "painting": ("groundtruth/painting.zip", 3679366174, "fa47e6d405503ea0286cabd767f176bd30e988b63ddd7b9db16cf030c9770015",
                 2241901, "f1da38d50a702fddf1329f85bc607d7a2abcae7e6aec75e1fd49cc1bd340d47b",
                 971888, "11472b13b5188e09f06918b12eebb660588c97a20e43e268d9b02e3e37eb8f97"),
    "quickdraw": ("quickdraw.zip", 459920701, "9f37df2a8c3733703dbb35ad9964202a65f675ca30137756457537536b485d84",
                  5164600, "3a5edd3bc215772010eebc87f158707703dd7e48091d13b816af81326a9d1c0f",
                  2213400, "2a00a60650a453c65c356da748fec54084a197272137c440e7d52d08947357bf"),
    "real": ("real.zip", 6062039589, "d7fe010b430c5b510f85d657d38c4a1924822695fabea4fef57bd00dba251d63",
             4440944, "19d483256d24aef19e581b65eda8333fd918aef3eb733fe499ff384120e3a289",
             1911327, "2b3f75bcde309aeb5931292084b2162e936b5f189e3bb1ad716f0f74c460864c"),
    "sketch": ("sketch.zip", 2633992926, "23a7dbae7016b343e934399beaa8a68728fb5e570ebe2c71df9b75cf91c499fc",
               1960222, "72f4bc6afa5702a1ccba800d0053c1427de87439dfaf246dbc9a2e71abfec54f",
               850581, "3fb48fca18c507c4321f007c3f62b308ec232ff6928cbfe2af64e76ec366e840"),
}


def _domainnet_archives() -> tuple[Archive, ...]:
    source = f"{TFDS} image_classification/domainnet/checksums.tsv"
    archives = []
    for domain, (zip_path, size, sha, train_size, train_sha, test_size, test_sha) in _DOMAINNET.items():
        archives.append(Archive(f"{domain}.zip", _DOMAINNET_BASE + zip_path, sha, size, source))
        for part, part_size, part_sha in (("train", train_size, train_sha), ("test", test_size, test_sha)):
            archives.append(Archive(f"{domain}_{part}.txt", f"{_DOMAINNET_BASE}domainnet/txt/{domain}_{part}.txt",
                                    part_sha, part_size, source))
    return tuple(archives)


CATALOG: dict[str, DatasetEntry] = {entry.name: entry for entry in (
    DatasetEntry(
        "cifar100", "CIFAR-100 (python release)", "https://www.cs.toronto.edu/~kriz/cifar.html",
        (Archive("cifar-100-python.tar.gz", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                 "85cd44d02ba6437773c5bbd22e183051d648de2e7d6b014e1ef29b855ba677a7", 169001437,
                 "keras.datasets.cifar100 (file_hash) and torchvision's prototype Cifar100 (sha256); its md5 "
                 "eb9058c3a382ffc7106e4002c42a8d85 is torchvision CIFAR100's tgz_md5"),),
        "cifar-100-python", "cifar", 100, "169 MB; 60,000 images (32 px)",
        "official: 500 train / 100 test per class, as released",
        "no licence stated by the authors; cite Krizhevsky (2009), see source",
        '"dataset": "cifar224" (or "cifar100" at 32 px), "data_path": ROOT'),
    DatasetEntry(
        "imagenetr", "ImageNet-R", "https://github.com/hendrycks/imagenet-r",
        (Archive("imagenet-r.tar", "https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar",
                 "18c6bf493b39a0d975d48e587437f562caab9c52ae6327dcfa9dd8eb54aa1b52", 2191079936,
                 f"{TFDS} datasets/imagenet_r/checksums.tsv (md5 a61312130a589d0ca1a8fca1f2bd3337 in "
                 f"torch-uncertainty's ImageNetR)"),),
        "imagenet-r", "rule_split", 200, "2.2 GB; 30,000 images",
        f"80/20 per class by rule ({RULE}); or, with --pilot-archive, {PILOT_SPLIT}",
        "research use; web images, see source",
        '"dataset": "imagenetr", "data_path": ROOT', pilot_archive=PILOT_README),
    DatasetEntry(
        "imageneta", "ImageNet-A", "https://github.com/hendrycks/natural-adv-examples",
        (Archive("imagenet-a.tar", "https://people.eecs.berkeley.edu/~hendrycks/imagenet-a.tar",
                 "3bb3632277e6ba6392ea64c02ddbf4dd2266c9caffd6bc09c9656d28f012589e", 687552512,
                 f"{TFDS} datasets/imagenet_a/checksums.tsv (md5 c3e55429088dc681f30d81f4726b6595 in "
                 f"torch-uncertainty's ImageNetA)"),),
        "imagenet-a", "rule_split", 200, "688 MB; 7,500 images",
        f"80/20 per class by rule ({RULE}); or, with --pilot-archive, {PILOT_SPLIT}",
        "research use; web images, see source",
        '"dataset": "imageneta", "data_path": ROOT', pilot_archive=PILOT_README),
    DatasetEntry(
        "cub", "CUB-200-2011", "https://www.vision.caltech.edu/datasets/cub_200_2011/",
        (Archive("CUB_200_2011.tgz", "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz",
                 "0c685df5597a8b24909f6a7c9db6d11e008733779a671760afef78feb49bf081", 1150585339,
                 f"{TFDS} url_checksums/caltech_birds2011.txt (the same file from its Google Drive mirror; md5 "
                 f"97eceeb196236b17998738112f37df78 in pytorch-metric-learning's CUB200)"),),
        "cub", "cub", 200, "1.1 GB; 11,788 images",
        f"official train_test_split.txt (5,994 train / 5,794 test); or, with --pilot-archive, {PILOT_SPLIT}",
        "research use; Flickr images, see source",
        '"dataset": "cub", "data_path": ROOT', pilot_archive=PILOT_README),
    DatasetEntry(
        "objectnet", "ObjectNet (PILOT's 200-class subset)", "https://objectnet.dev",
        (Archive("objectnet.zip"),), "objectnet", "pilot_split", 200, "PILOT's subset of ObjectNet (50,000 images, 313 classes)",
        PILOT_SPLIT + "; which 200 classes and images PILOT sampled is not published, so pilot cannot rebuild it "
        "from objectnet-1.0.zip",
        "ObjectNet's own licence restricts its use (read it at objectnet.dev before use); PILOT's README: "
        "'I do not have the right to distribute these datasets'",
        '"dataset": "objectnet", "data_path": ROOT',
        no_download=f"PILOT's archive is on OneDrive, which serves it through a web page: download it in a browser "
                    f"({PILOT_README})"),
    DatasetEntry(
        "omnibenchmark", "OmniBenchmark (PILOT's 300-class subset)", "https://github.com/ZhangYuanhan-AI/OmniBenchmark",
        (Archive("omnibenchmark.zip"),), "omnibenchmark", "pilot_split", 300, "PILOT's subset of OmniBenchmark",
        PILOT_SPLIT + "; PILOT's sample is not published as a rule, so pilot cannot rebuild it from the original",
        "see source; PILOT's README: 'I do not have the right to distribute these datasets'",
        '"dataset": "omnibenchmark", "data_path": ROOT',
        no_download=f"PILOT's archive is on Google Drive / OneDrive, which serve it through a web page: download "
                    f"it in a browser ({PILOT_README})"),
    DatasetEntry(
        "vtab", "VTAB (PILOT's 5-task subset)", "https://google-research.github.io/task_adaptation/",
        (Archive("vtab.zip"),), "vtab", "pilot_split", 50,
        "PILOT's subset: 5 VTAB tasks (resisc45, dtd, pets, eurosat, flowers), 10 classes each",
        PILOT_SPLIT + "; built from VTAB's tasks by PILOT's authors, not published as a rule",
        "each source task's own licence; PILOT's README: 'I do not have the right to distribute these datasets'",
        '"dataset": "vtab", "data_path": ROOT',
        no_download=f"PILOT's archive is on Google Drive / OneDrive, which serve it through a web page: download "
                    f"it in a browser ({PILOT_README})"),
    DatasetEntry(
        "domainnet", "DomainNet (cleaned)", "http://ai.bu.edu/M3SDA/", _domainnet_archives(),
        "domainnet", "domainnet", 345, "18.4 GB in 6 zips; about 0.6M images in 6 domains",
        "official: the <domain>_train.txt / <domain>_test.txt lists, as released",
        "research use (fair-use notice on the site), see source",
        '"dataset": "domainnet", "scenario": "domain", "data_path": ROOT', domains=DOMAINNET_DOMAINS),
    DatasetEntry(
        "core50", "CORe50 (128x128)", "https://vlomonaco.github.io/core50/",
        (Archive("core50_128x128.zip", "http://bias.csr.unibo.it/maltoni/download/core50/core50_128x128.zip"),),
        "core50", "core50", 50, "about 165,000 frames of 50 objects in 11 sessions",
        f"each session is a domain, split 80/20 per object by rule ({RULE}, per session); NOT the usual "
        f"protocol (train on 8 sessions, test on sessions 3, 7, 10), which a domain stream that tests each "
        f"domain on its own images cannot express",
        "see source",
        '"dataset": "domain_folder", "scenario": "domain", "data_path": ROOT/core50'),
    DatasetEntry(
        "officehome", "Office-Home", "https://www.hemanthdv.org/officeHomeDataset.html",
        (Archive("OfficeHomeDataset_10072016.zip"),), "officehome", "officehome", 65,
        "about 15,500 images of 65 classes in 4 domains",
        f"not in the release: 80/20 per domain and class by rule ({RULE}, per domain)",
        "research use only (the authors' terms), see source",
        '"dataset": "domain_folder", "scenario": "domain", "data_path": ROOT/officehome',
        no_download="the archive is on Google Drive, which serves it through a web page: download it in a browser "
                    "from https://www.hemanthdv.org/officeHomeDataset.html"),
)}


def entry(name: str) -> DatasetEntry:
    if name not in CATALOG:
        raise PilotError(f"pilot data knows no dataset '{name}'. Known: {', '.join(CATALOG)} "
                         f"(pilot data list describes each).")
    return CATALOG[name]


# A config's dataset -> the catalog entry that prepares it (cifar224 and cifar100 read the same files).
FOR_CONFIG = {"cifar224": "cifar100", "cifar100": "cifar100", "imagenetr": "imagenetr", "imageneta": "imageneta",
              "cub": "cub", "objectnet": "objectnet", "omnibenchmark": "omnibenchmark", "vtab": "vtab",
              "domainnet": "domainnet"}
