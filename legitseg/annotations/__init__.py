"""`legitseg annotations`: an OUT's masks as COCO, GeoJSON or DICOM Segmentation files."""
