"""mlora.jobs"""
