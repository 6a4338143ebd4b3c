from legitseg.cli import main

main()
