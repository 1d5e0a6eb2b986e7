"""DICOM-SEG and RTSTRUCT export: written, read back with highdicom / rt-utils, compared with the mask."""
import highdicom as hd
import numpy as np
import pydicom
import pytest
from rt_utils import RTStructBuilder

from ctseg.cli import main as cli_main
from ctseg.dicom import write_dicom_series
from ctseg.errors import CtsegError
from ctseg.export import label_on_instance, write_dicom_seg, write_rtstruct
from ctseg.dicom import read_dicom_series
from ctseg.io import Volume, read_volume, resample_to

KITS = {0: "background", 1: "kidney", 2: "tumour"}


def _series(folder, shape, spacing, direction, reverse_files):
    """Write a CT series and return (paths in written slice order, written HU volume, label on that grid)."""
    nz, ny, nx = shape
    hu = np.full(shape, -1000, np.int16)
    hu[:, 3:ny - 3, 3:nx - 3] = 30
    lab = np.zeros(shape, np.uint8)
    lab[2:nz - 2, 6:ny // 2 + 4, 5:nx // 2] = 1          # off-centre, asymmetric: flips would show
    lab[3:nz - 3, 9:ny // 2, 8:nx // 3] = 2
    hu[lab == 1] = 180
    hu[lab == 2] = 400
    vol = Volume(hu, spacing, origin=(25.0, -40.0, 110.0), direction=direction)
    names = [f"{k:04d}.dcm" for k in range(nz)]
    paths = write_dicom_series(vol, folder, file_names=names[::-1] if reverse_files else names)
    return paths, vol, vol.with_array(lab)


CASES = [  # (shape, spacing, direction, reverse file order)
    ((8, 40, 40), (2.5, 0.7, 0.7), np.eye(3), False),
    ((8, 40, 40), (2.5, 0.7, 0.7), np.diag([-1.0, 1.0, 1.0]), True),      # flipped rows, reversed files
    ((7, 36, 36), (3.0, 0.8, 0.8), np.diag([1.0, -1.0, -1.0]), False),    # flipped columns, slices run S->I
]


@pytest.mark.parametrize("shape,spacing,direction,reverse", CASES)
def test_dicom_seg_roundtrip(tmp_path, shape, spacing, direction, reverse):
    paths, _, lab_written = _series(tmp_path / "ct", shape, spacing, direction, reverse)
    vol = read_dicom_series(tmp_path / "ct")
    label = resample_to(lab_written, vol, order=0)  # the NIfTI-side mask, on the grid the reader returns
    out = write_dicom_seg(label, tmp_path / "ct", tmp_path / "seg.dcm", KITS)
    seg = hd.seg.segread(out)
    assert seg.SegmentationType == "BINARY"
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["kidney", "tumour"]
    assert seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue == "64033007"
    assert seg.SegmentSequence[1].SegmentedPropertyTypeCodeSequence[0].CodeValue == "108369006"
    assert seg.SegmentSequence[1].SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
    src = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    assert seg.StudyInstanceUID == src[0].StudyInstanceUID
    assert seg.FrameOfReferenceUID == src[0].FrameOfReferenceUID
    uids = [ds.SOPInstanceUID for ds in src]
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, combine_segments=True,
                                               skip_overlap_checks=True)
    # file k holds written array slice k with the file's own row/column order
    np.testing.assert_array_equal(pixels, lab_written.array)


def test_rtstruct_roundtrip_with_flipped_rows_and_reversed_files(tmp_path):
    shape, spacing, direction, reverse = CASES[1]
    paths, _, lab_written = _series(tmp_path / "ct", shape, spacing, direction, reverse)
    vol = read_dicom_series(tmp_path / "ct")
    label = resample_to(lab_written, vol, order=0)
    out = write_rtstruct(label, tmp_path / "ct", tmp_path / "rt" / "rtstruct.dcm", KITS)
    rt = RTStructBuilder.create_from(str(tmp_path / "ct"), str(out))
    assert rt.get_roi_names() == ["kidney", "tumour"]
    order = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: k for k, p in enumerate(paths)}
    for name, value in (("kidney", 1), ("tumour", 2)):
        mask = rt.get_roi_mask_by_name(name)  # (rows, cols, n) in rt-utils' slice order (square images)
        for i, ds in enumerate(rt.series_data):
            expected = lab_written.array[order[ds.SOPInstanceUID]] == value
            np.testing.assert_array_equal(mask[:, :, i], expected, err_msg=f"{name} slice {i}")


def test_export_refusals(tmp_path):
    paths, _, lab_written = _series(tmp_path / "ct", (6, 30, 30), (2.0, 0.8, 0.6), np.eye(3), False)
    vol = read_dicom_series(tmp_path / "ct")
    with pytest.raises(CtsegError, match="square pixels"):
        write_rtstruct(lab_written, tmp_path / "ct", tmp_path / "rt.dcm", KITS)
    # a label made for another grid
    shifted = Volume(lab_written.array, lab_written.spacing, origin=(25.3, -40.0, 110.0))
    with pytest.raises(CtsegError, match="voxel grid"):
        label_on_instance(shifted, pydicom.dcmread(paths[0], stop_before_pixels=True))
    # empty UIDs (over-anonymised series) cannot be referenced
    bad = tmp_path / "anon"
    bad.mkdir()
    for p in paths:
        ds = pydicom.dcmread(p)
        ds.SOPInstanceUID = ""
        ds.save_as(bad / p.name)
    with pytest.raises(CtsegError, match="SOPInstanceUID is empty"):
        write_dicom_seg(vol.with_array(np.zeros(vol.shape, np.uint8)), bad, tmp_path / "x.dcm", KITS)


def test_cli_dicom_seg_output(tmp_path):
    from test_predict import _expected, _write_run_dir

    _series(tmp_path / "ct", (8, 32, 32), (2.5, 0.7, 0.7), np.diag([-1.0, 1.0, 1.0]), True)
    run = _write_run_dir(tmp_path / "run", size=32)
    out = tmp_path / "seg.dcm"
    assert cli_main(["predict", "-i", str(tmp_path / "ct"), "-o", str(out), "--model", str(run),
                     "--device", "cpu", "--output-type", "dicom-seg", "--no-progress"]) == 0
    seg = hd.seg.segread(out)
    vol = read_dicom_series(tmp_path / "ct")
    files = vol.meta["slice_files"]
    uids = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files]
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, combine_segments=True,
                                               skip_overlap_checks=True)
    np.testing.assert_array_equal(pixels, _expected(vol.array))
    rt_out = tmp_path / "rt.dcm"
    assert cli_main(["predict", "-i", str(tmp_path / "ct"), "-o", str(rt_out), "--model", str(run),
                     "--device", "cpu", "--output-type", "rtstruct", "--no-progress"]) == 0
    assert RTStructBuilder.create_from(str(tmp_path / "ct"), str(rt_out)).get_roi_names() == ["kidney", "tumour"]


def test_real_ct_empty_uids_refused_but_nifti_works(tmp_path, real_ct_dir):
    """The real fixture's anonymisation emptied its UIDs: DICOM-SEG is refused with a clear reason."""
    vol = read_volume(real_ct_dir / "DICOM_anon")
    mask = resample_to(read_volume(real_ct_dir / "liver_mask.nii.gz"), vol, order=0)
    assert mask.array.any()
    with pytest.raises(CtsegError, match="is empty"):
        write_dicom_seg(mask.with_array(mask.array.astype(np.uint8)), real_ct_dir / "DICOM_anon",
                        tmp_path / "seg.dcm", {0: "background", 1: "liver"})
