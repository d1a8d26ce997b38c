from data_synth.tag.command import main

main()
