"""The QGIS side of ViRefSAM: dock, map tools, the QgsTask that runs the engine, export, Processing provider.

Everything here runs inside QGIS (qgis.core / qgis.gui / qgis.PyQt); the engine lives in ``core/`` and never
imports Qt.
"""
