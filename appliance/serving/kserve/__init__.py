"""serving/kserve"""
