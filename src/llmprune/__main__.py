from llmprune.cli.main import main

main()
